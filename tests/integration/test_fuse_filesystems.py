"""NTFS and exFAT, through the kernel's driver where it has one and the userspace one
(FUSE) where it does not: a GPT disk whose NTFS (made with mkntfs, filled through ntfs-3g)
or exFAT (mkfs.exfat, filled through exfat-fuse) partition attaches read-only through a
real mount, files compared by SHA-256, names kept, `status` naming a userspace driver, the
mount's flags set, nothing left after detach."""

import contextlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backupfs.attach.fstypes import is_userspace, mount_type
from tests.support.attachment import attach_env, attached, served_store
from tests.support.fsimages import run_tool, sparse_copy
from tests.support.mounting import run_cli, sha256_file
from tests.support.system import mount_points_under, unmount
from tests.support.trees import make_tree

MiB, SECTOR = 1 << 20, 512
BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"  # Windows' basic data partition


@contextlib.contextmanager
def _loop(path: Path) -> Iterator[str]:
    device = run_tool(["losetup", "-f", "--show", str(path)]).strip()
    try:
        yield device
    finally:
        run_tool(["losetup", "-d", device])


def _fill(path: Path, tree: Path, mount: Callable[[Path], None]) -> None:
    mnt = path.with_suffix(".mnt")
    mnt.mkdir()
    mount(mnt)
    try:
        shutil.copytree(tree, mnt / "Users", symlinks=False, ignore_dangling_symlinks=True,
                        dirs_exist_ok=True)  # fmt: skip
    finally:
        unmount(mnt)
        mnt.rmdir()


def _ntfs(path: Path, tree: Path) -> None:
    run_tool(["mkntfs", "-q", "-F", "-Q", "-L", "WINC", str(path)])
    _fill(path, tree, lambda mnt: run_tool(["ntfs-3g", str(path), str(mnt)]))


def _exfat(path: Path, tree: Path) -> None:
    run_tool(["mkfs.exfat", "-L", "WINC", str(path)])
    with _loop(path) as device:  # exfat-fuse wants a block device when run as root
        _fill(path, tree, lambda mnt: run_tool(["mount", "-t", "exfat-fuse", device, str(mnt)]))


CASES = {  # what makes the filesystem here, and the userspace driver that fills it
    "ntfs": ("mkntfs", "ntfs-3g", _ntfs),
    "exfat": ("mkfs.exfat", "exfat-fuse", _exfat),
}


@pytest.mark.parametrize("fstype", sorted(CASES))
def test_an_ntfs_or_exfat_partition_attaches_read_only(fstype: str, tmp_path: Path) -> None:
    mkfs, filler, build = CASES[fstype]
    if shutil.which(mkfs) is None or shutil.which(f"mount.{filler}") is None:
        pytest.skip(f"{filler} is not installed")
    driver = mount_type(fstype)  # the kernel's where it has one
    store, work = tmp_path / "store", tmp_path / "work"
    disk = store / "win01" / "2026-11-20T0300Z" / "disk0.img"
    disk.parent.mkdir(parents=True)
    (work / "serve").mkdir(parents=True)
    sums = make_tree(work / "tree", seed=21, files=16, special=False)
    (work / "tree" / "MixedCase Name.txt").write_text("kept as written")
    sums["MixedCase Name.txt"] = sha256_file(work / "tree" / "MixedCase Name.txt")
    fs = work / "part.img"
    run_tool(["truncate", "-s", "48M", str(fs)])
    build(fs, work / "tree")
    run_tool(["truncate", "-s", "52M", str(disk)])
    script = f"label: gpt\nstart=2048, size={48 * MiB // SECTOR}, type={BASIC_DATA}\n"
    run_tool(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never",
              str(disk)], stdin=script)  # fmt: skip
    sparse_copy(fs, disk, MiB)
    with served_store(store, work / "serve") as served:
        env = attach_env(work / "run")
        image = served.image("win01/2026-11-20T0300Z/disk0.img")
        with attached(image, work / "target", env) as att:
            root = att.target / "p1"
            for rel, digest in sums.items():
                assert sha256_file(root / "Users" / rel) == digest, rel
            status = run_cli("status", env=env)
            assert status.returncode == 0, status.stderr
            line = next(x for x in status.stdout.splitlines() if f"p1  {fstype}" in x)
            assert line.startswith(f"  p1  {fstype} [WINC]  ") and "mounted" in line, line
            assert (f"mounted by {driver}" in line) == is_userspace(driver), line
            options = _mount_options(root)
            assert {"ro", "nosuid", "nodev", "noexec", "nosymfollow"} <= options, options
            with pytest.raises(OSError):
                (root / "new-file").write_text("refused")
        assert mount_points_under(work / "target") == []


def _mount_options(path: Path) -> set[str]:
    out = subprocess.run(["findmnt", "-n", "-o", "VFS-OPTIONS", str(path)], capture_output=True,
                         text=True, timeout=30).stdout  # fmt: skip
    return set(out.strip().split(","))
