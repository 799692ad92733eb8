"""The disk-image builders in tests/support/disks.py make what they promise."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.disks import make_disk
from tests.support.fsimages import MIB, PartSpec
from tests.support.kernel import needs_filesystems
from tests.support.system import remove_tree, unmount
from tests.support.trees import make_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, loop mounts)")

GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
GPT_EFI = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


@dataclass(frozen=True)
class Tree:
    root: Path
    sha256: dict[str, str]


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


def _sfdisk(image: Path) -> tuple[str, list[tuple[int, int, str]]]:
    table = json.loads(_run("sfdisk", "--json", str(image)))["partitiontable"]
    sector = table["sectorsize"]
    parts = [(p["start"] * sector, p["size"] * sector, p["type"]) for p in table["partitions"]]
    return table["label"], parts


def _blkid(image: Path, offset: int, size: int) -> dict[str, str]:
    out = _run("blkid", "-p", "-o", "export", "-O", str(offset), "-S", str(size), str(image))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _mounted_ro(image: Path, offset: int, size: int, mnt: Path) -> Iterator[Path]:
    loop = _run(
        "losetup", "--find", "--show", "--read-only",
        "--offset", str(offset), "--sizelimit", str(size), str(image),
    ).strip()  # fmt: skip
    try:
        _run("mount", "-o", "ro", loop, str(mnt))
        try:
            yield mnt
        finally:
            unmount(mnt)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True, timeout=60)


def _check_tree(mnt: Path, tree: Tree) -> None:
    """Every file, the symlinks, the setuid bit and the device node made it over."""
    for rel, digest in tree.sha256.items():
        assert _sha256((mnt / rel).read_bytes()) == digest, rel
    assert os.readlink(mnt / "links/abs-link") == "/etc/hostname"
    rel_link = mnt / "links/rel-link"
    assert os.readlink(rel_link) == os.readlink(tree.root / "links/rel-link")
    assert _sha256(rel_link.read_bytes()) == _sha256((tree.root / "links/rel-link").read_bytes())
    st = (mnt / "bin/suid-id").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == 0
    dev = (mnt / "dev/null-copy").lstat()
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    assert (mnt / "empty-dir").is_dir()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    work = tmp_path_factory.mktemp("tree")
    try:
        yield Tree(work / "t", make_tree(work / "t", seed=7))
    finally:
        remove_tree(work)


def test_make_tree_is_deterministic(tmp_path: Path, tree: Tree) -> None:
    again = make_tree(tmp_path / "again", seed=7, special=False)
    assert again == {k: v for k, v in tree.sha256.items() if k != "bin/suid-id"}
    assert make_tree(tmp_path / "other", seed=8, special=False) != again
    sizes = [(tree.root / rel).stat().st_size for rel in tree.sha256]
    assert min(sizes) == 0 and max(sizes) > 2 * MIB and max(sizes) <= 8 * MIB
    assert (tree.root / "links/rel-link").is_symlink()
    assert not os.readlink(tree.root / "links/rel-link").startswith("/")


@needs_filesystems("xfs", "btrfs")
def test_gpt_ext4_xfs_btrfs(tmp_path: Path, tree: Tree) -> None:
    image = tmp_path / "gpt.img"
    specs = [
        PartSpec("ext4", 48, "root4", tree.root),
        PartSpec("xfs", 300, "xfsdata", tree.root),
        PartSpec("btrfs", 64, "butter", tree.root),
    ]
    layout = make_disk(image, "gpt", specs)

    label, parts = _sfdisk(image)
    assert label == "gpt"
    assert [(off, size) for off, size, _ in parts] == layout
    assert [t for _, _, t in parts] == [GPT_LINUX] * 3
    assert [size for _, size in layout] == [s.size_mib * MIB for s in specs]
    assert all(off % MIB == 0 for off, _ in layout)
    assert image.stat().st_blocks * 512 < image.stat().st_size // 4  # still sparse

    for (off, size), spec in zip(layout, specs, strict=True):
        info = _blkid(image, off, size)
        assert (info.get("TYPE"), info.get("LABEL")) == (spec.fstype, spec.label)

    # ext4: read a file back with debugfs, straight from the partition's offset
    rel = max(tree.sha256, key=lambda r: (tree.root / r).stat().st_size)
    data = subprocess.run(
        ["debugfs", "-R", f'cat "/{rel}"', f"{image}?offset={layout[0][0]}"],
        check=True, capture_output=True, timeout=60,
    ).stdout  # fmt: skip
    assert _sha256(data) == tree.sha256[rel]
    mode = _run("debugfs", "-R", "stat /bin/suid-id", f"{image}?offset={layout[0][0]}")
    assert "Mode:  04755" in mode

    # xfs (filled through a loop mount) and btrfs (--rootdir, device nodes fixed): everything
    for off, size in layout[1:]:
        mnt = tmp_path / f"mnt-{off}"
        mnt.mkdir()
        with _mounted_ro(image, off, size, mnt):
            _check_tree(mnt, tree)


def test_dos_ext2_vfat_swap(tmp_path: Path, tree: Tree) -> None:
    image = tmp_path / "dos.img"
    specs = [
        PartSpec("ext2", 40, "twofs", tree.root),
        PartSpec("vfat", 40, "ESP", tree.root),
        PartSpec("swap", 8, "swappy"),
    ]
    layout = make_disk(image, "dos", specs)

    label, parts = _sfdisk(image)
    assert label == "dos"
    assert [(off, size) for off, size, _ in parts] == layout
    assert [t for _, _, t in parts] == ["83", "e", "82"]  # 40 MiB of vfat is FAT16
    for (off, size), spec in zip(layout, specs, strict=True):
        info = _blkid(image, off, size)
        assert (info.get("TYPE"), info.get("LABEL")) == (spec.fstype, spec.label)

    # vfat: regular files only, read back with mtools at the partition's offset
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for rel in (next(r for r in tree.sha256 if r.endswith("with space.txt")), "bin/suid-id"):
        data = subprocess.run(
            ["mcopy", "-n", "-i", f"{image}@@{layout[1][0]}", f"::/{rel}", "-"],
            check=True, capture_output=True, timeout=60, env=env,
        ).stdout  # fmt: skip
        assert _sha256(data) == tree.sha256[rel]
    listing = subprocess.run(
        ["mdir", "-/", "-b", "-i", f"{image}@@{layout[1][0]}", "::/"],
        check=True, capture_output=True, text=True, timeout=60, env=env,
    ).stdout  # fmt: skip
    names = {line.removeprefix("::/") for line in listing.splitlines()}
    assert {r for r in tree.sha256} <= names
    # the directories are there, but neither symlinks nor the device node
    assert {"links/", "dev/", "empty-dir/"} <= names
    assert not [n for n in names if n.startswith(("links/", "dev/")) and not n.endswith("/")]


def test_bare_ext3(tmp_path: Path, tree: Tree) -> None:
    image = tmp_path / "bare.img"
    layout = make_disk(image, "none", [PartSpec("ext3", 40, "bare3", tree.root)])
    assert layout == [(0, 40 * MIB)] and image.stat().st_size == 40 * MIB
    info = _blkid(image, 0, 40 * MIB)
    assert (info.get("TYPE"), info.get("LABEL")) == ("ext3", "bare3")
    assert "PTTYPE" not in info
    rel = next(r for r in tree.sha256 if r.startswith("data/"))
    data = subprocess.run(
        ["debugfs", "-R", f'cat "/{rel}"', str(image)], check=True, capture_output=True, timeout=60
    ).stdout
    assert _sha256(data) == tree.sha256[rel]


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_disk(tmp_path / "a.img", "none", [PartSpec("ext4", 8), PartSpec("ext4", 8)])
    with pytest.raises(ValueError):
        make_disk(tmp_path / "b.img", "gpt", [PartSpec("xfs", 64)])
    with pytest.raises(ValueError):
        make_disk(tmp_path / "c.img", "dos", [PartSpec("ext2", 1)] * 5)
    with pytest.raises(ValueError):
        make_disk(tmp_path / "d.img", "apm", [PartSpec("ext2", 1)])
    assert not list(tmp_path.iterdir())
