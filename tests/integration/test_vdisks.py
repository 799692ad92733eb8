"""Virtual disks through the whole product: images made by qemu-img are indexed, served
as `<disk>.img` at their virtual size, byte for byte what `qemu-img convert -O raw` gives,
and an ext4 inside the top of a chain attaches with the top snapshot's files."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupfs.store import manifest
from tests.support import vhdwriter
from tests.support.attachment import attach_env, attached
from tests.support.catalogue import read_store_catalogue
from tests.support.fsimages import _loop_mounted, run_tool
from tests.support.kernel import needs_filesystems
from tests.support.mounting import mounted, read_stats, run_cli, sha256_file
from tests.support.nginx import Nginx
from tests.support.trees import make_tree

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
    needs_filesystems("ext4"),  # the snapshots' disks are changed through an ext4 loop mount
]
MiB = 1 << 20
DISK_MIB = 64
SNAPS = ("2026-11-01T0300Z", "2026-11-02T0300Z", "2026-11-03T0300Z")


def qemu_img(*args: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert proc.returncode == 0, proc.stderr


def as_raw(image: Path, fmt: str, out: Path) -> Path:
    qemu_img("convert", "-f", fmt, "-O", "raw", str(image), str(out))
    return out


OTHER_FORMATS = {
    "zlib.qcow2": ["-c", "-O", "qcow2"],
    "zstd.qcow2": ["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
    "sparse.vmdk": ["-O", "vmdk", "-o", "subformat=monolithicSparse"],
    "stream.vmdk": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "flat.vmdk": ["-O", "vmdk", "-o", "subformat=monolithicFlat"],
    "vhd-dynamic.vhd": ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
    "vhd-fixed.vhd": ["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
    "vhdx-dynamic.vhdx": ["-O", "vhdx"],
}


@dataclass
class Chain:
    """Three snapshots of one ext4 disk: raw truth, and the qcow2 chain in the store."""

    raws: list[Path]  # what each snapshot's disk holds
    trees: list[dict[str, str]]  # the files of each snapshot: path -> sha256
    store: Path


def _snapshot_raws(work: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """s1: an ext4 made from a tree; s2, s3: the one before with files changed, added and
    removed through a loop mount (so most blocks stay where they were)."""
    tree = work / "tree"
    files = make_tree(tree, seed=7, files=24, special=False)
    raws = [work / "s1.raw"]
    run_tool(["truncate", "-s", f"{DISK_MIB}M", str(raws[0])])
    run_tool(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(raws[0])])
    trees = [dict(files)]
    rng = random.Random(3)
    for n in (2, 3):
        raw = work / f"s{n}.raw"
        run_tool(["cp", "--sparse=always", str(raws[-1]), str(raw)])
        files = dict(trees[-1])
        with _loop_mounted(raw, "ext4") as root:
            changed = sorted(files)[n::5]
            for rel in changed:
                data = rng.randbytes(rng.randrange(1, 300_000))
                (root / rel).write_bytes(data)
                files[rel] = hashlib.sha256(data).hexdigest()
            new = f"new-in-s{n}.bin"
            data = rng.randbytes(2 * MiB)
            (root / new).write_bytes(data)
            files[new] = hashlib.sha256(data).hexdigest()
            gone = sorted(files)[0]
            (root / gone).unlink()
            del files[gone]
        raws.append(raw)
        trees.append(files)
    return raws, trees


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    work = tmp_path_factory.mktemp("vdisks")
    raws, trees = _snapshot_raws(work)
    store = work / "store"
    dirs = [store / "web01" / s for s in SNAPS]
    for d in dirs:
        d.mkdir(parents=True)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raws[0]), str(dirs[0] / "disk0.qcow2"))
    for n in (1, 2):
        # A true increment: the overlay gets only the clusters that differ from its parent.
        top = dirs[n] / "disk0.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(raws[n]), "-F", "raw", str(top))
        parent = f"../{SNAPS[n - 1]}/disk0.qcow2"
        qemu_img("rebase", "-f", "qcow2", "-b", parent, "-F", "qcow2", str(top), cwd=dirs[n])
    # The last snapshot in every other format, side by side (each served as NAME.img).
    other = store / "web02" / SNAPS[2]
    other.mkdir(parents=True)
    for name, args in OTHER_FORMATS.items():
        qemu_img("convert", "-f", "raw", *args, str(raws[2]), str(other / name))
    _delta_chains(store, raws, work)
    yield Chain(raws, trees, store)


def _write_differences(top: Path, fmt: str, old: Path, new: Path, work: Path) -> None:
    """qemu-io writes into `top` every 64 KiB of `new` that differs from `old`."""
    commands = []
    with open(old, "rb") as a, open(new, "rb") as b:
        for offset in range(0, new.stat().st_size, 64 << 10):
            piece = os.pread(b.fileno(), 64 << 10, offset)
            if piece != os.pread(a.fileno(), 64 << 10, offset):
                src = work / f"piece-{offset}"
                src.write_bytes(piece)
                commands += ["-c", f"write -q -s {src} {offset} {len(piece)}"]
    proc = subprocess.run(["qemu-io", "-f", fmt, *commands, str(top)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def _delta_chains(store: Path, raws: list[Path], work: Path) -> None:
    """Two-deep chains of snapshots 1 and 2 in VMDK (a qemu delta), VHD and VHDX
    (differencing disks that qemu cannot write: tests/support/vhdwriter.py)."""
    s1, s2 = (store / "web03" / SNAPS[0], store / "web03" / SNAPS[1])
    for d in (s1, s2):
        d.mkdir(parents=True)
    qemu_img("convert", "-f", "raw", "-O", "vmdk", str(raws[0]), str(s1 / "disk0.vmdk"))
    parent = f"../{SNAPS[0]}/disk0.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", parent, "-F", "vmdk", str(s2 / "disk0.vmdk"),
             cwd=s2)  # fmt: skip
    _write_differences(s2 / "disk0.vmdk", "vmdk", raws[0], raws[1], work)
    vhd = store / "web04" / SNAPS[1]
    vhd.mkdir(parents=True)
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on",
             str(raws[0]), str(vhd / "base.vhd"))  # fmt: skip
    vhdwriter.write_differencing_vhd(vhd / "disk0.vhd", vhd / "base.vhd", raws[0], raws[1],
                                     absolute=False)  # fmt: skip
    x1, x2 = store / "web05" / SNAPS[0], store / "web05" / SNAPS[1]
    for d in (x1, x2):
        d.mkdir(parents=True)
    qemu_img("convert", "-f", "raw", "-O", "vhdx", str(raws[0]), str(x1 / "disk0.vhdx"))
    relative = {"relative_path": f"..\\{SNAPS[0]}\\disk0.vhdx"}  # as Hyper-V writes it
    vhdwriter.write_differencing_vhdx(
        x2 / "disk0.vhdx", x1 / "disk0.vhdx", raws[0], raws[1], paths=relative
    )


def _catalogue(store: Path) -> dict[str, dict[str, object]]:
    doc = json.loads(manifest.dump_catalogue(read_store_catalogue(store)))  # version 3 read
    return {f"{s['host']}/{s['name']}/{d['name']}": d for s in doc["snapshots"] for d in s["disks"]}


def test_index_records_formats_and_chains(chain: Chain) -> None:
    indexed = run_cli("index", str(chain.store))
    assert indexed.returncode == 0, indexed.stderr
    disks = _catalogue(chain.store)
    top = disks[f"web01/{SNAPS[2]}/disk0.qcow2"]
    assert top["format"] == "qcow2" and top["virtual_size"] == DISK_MIB * MiB
    assert top["parent"] == f"web01/{SNAPS[1]}/disk0.qcow2"
    assert disks[f"web01/{SNAPS[1]}/disk0.qcow2"]["parent"] == f"web01/{SNAPS[0]}/disk0.qcow2"
    assert "parent" not in disks[f"web01/{SNAPS[0]}/disk0.qcow2"]
    # An increment is stored small: its digests are of the stored file, not the disk.
    assert int(top["size_bytes"]) < DISK_MIB * MiB // 4  # type: ignore[call-overload]


@pytest.fixture
def served(chain: Chain, tmp_path: Path) -> Iterator[Path]:
    indexed = run_cli("index", str(chain.store))
    assert indexed.returncode == 0, indexed.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with Nginx(chain.store, tmp_path / "nginx") as nginx, mounted(nginx.url, mnt):
        yield mnt


def test_each_snapshot_is_served_as_its_raw_disk(chain: Chain, served: Path) -> None:
    before = read_stats(served)["bytes_served"]
    for snap, raw in zip(SNAPS, chain.raws, strict=True):
        disk = served / "web01" / snap / "disk0.img"
        assert disk.stat().st_size == DISK_MIB * MiB
        assert sorted(p.name for p in disk.parent.iterdir()) == ["disk0.img"]
        assert sha256_file(disk) == sha256_file(raw), snap
    others = served / "web02" / SNAPS[2]
    names = sorted(n.rsplit(".", 1)[0] + ".img" for n in OTHER_FORMATS)
    assert sorted(p.name for p in others.iterdir()) == names  # no extent file shown
    for name in names:
        assert (others / name).stat().st_size == DISK_MIB * MiB, name
        assert sha256_file(others / name) == sha256_file(chain.raws[2]), name
    # What readers got, zeros included, and not the tables read on the way.
    served_bytes = read_stats(served)["bytes_served"] - before
    assert served_bytes == (len(SNAPS) + len(names)) * DISK_MIB * MiB


@pytest.mark.parametrize(
    ("host", "snap", "name"),
    [("web03", SNAPS[1], "disk0.img"), ("web04", SNAPS[1], "disk0.img"),
     ("web05", SNAPS[1], "disk0.img")],
    ids=["vmdk-delta", "vhd-differencing", "vhdx-differencing"],
)  # fmt: skip
def test_delta_disks_read_their_snapshot(
    chain: Chain, served: Path, host: str, snap: str, name: str
) -> None:
    assert sha256_file(served / host / snap / name) == sha256_file(chain.raws[1])
    assert sha256_file(served / "web03" / SNAPS[0] / "disk0.img") == sha256_file(chain.raws[0])


def test_random_ranges_of_the_top_match_qemu(chain: Chain, served: Path, tmp_path: Path) -> None:
    top = chain.store / "web01" / SNAPS[2] / "disk0.qcow2"
    truth = as_raw(top, "qcow2", tmp_path / "top.raw").read_bytes()
    rng = random.Random(11)
    with open(served / "web01" / SNAPS[2] / "disk0.img", "rb") as f:
        for _ in range(1000):
            offset = rng.randrange(0, len(truth))
            size = rng.choice([1, 511, 4096, 65536, 300_000, 2 * MiB])
            assert os.pread(f.fileno(), size, offset) == truth[offset : offset + size], offset


def test_an_unallocated_region_costs_no_fetch(chain: Chain, served: Path) -> None:
    """The end of the base disk is never written by mke2fs: zeros, read without fetching
    more than the tables."""
    disk = served / "web01" / SNAPS[0] / "disk0.img"
    with open(disk, "rb") as f:
        os.pread(f.fileno(), 4096, 0)  # the tables of the start
        before = read_stats(served)["bytes_fetched"]
        data = os.pread(f.fileno(), 4 * MiB, DISK_MIB * MiB - 4 * MiB)
    assert data == bytes(4 * MiB)
    assert read_stats(served)["bytes_fetched"] - before <= 256 << 10  # an L2 piece at most


@needs_filesystems("ext4")
def test_the_top_of_the_chain_attaches_with_its_files(
    chain: Chain, served: Path, tmp_path: Path
) -> None:
    env = attach_env(tmp_path / "run")
    with attached(served / "web01" / SNAPS[2] / "disk0.img", tmp_path / "target", env) as att:
        root = att.target / "p0"  # a disk without a partition table: one filesystem
        files = {
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and "lost+found" not in p.parts
        }
        assert files == set(chain.trees[2])  # added in the increments, and removed
        for rel, digest in chain.trees[2].items():
            assert sha256_file(root / rel) == digest, rel


@needs_filesystems("ext4")
def test_restore_from_the_top_of_the_chain_uses_a_read_plan(
    chain: Chain, served: Path, tmp_path: Path
) -> None:
    env = attach_env(tmp_path / "run")
    with attached(served / "web01" / SNAPS[2] / "disk0.img", tmp_path / "target", env) as att:
        before = read_stats(served)
        dest = tmp_path / "out"
        result = run_cli("restore", "--json", str(att.target / "p0"), str(dest), env=env)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        after = read_stats(served)
    assert summary["planned_bytes"] > 0 and summary["files"] >= len(chain.trees[2])
    assert after["plan_bytes"] - before["plan_bytes"] >= summary["planned_bytes"] // 2
    for rel, digest in chain.trees[2].items():
        assert sha256_file(dest / rel) == digest, rel


def test_a_damaged_table_is_eio_for_its_range_only(tmp_path: Path) -> None:
    """An L2 entry that points past the end of the file passes the index (L2 tables are
    read when a range needs them) and fails the reads of its cluster with EIO; the rest of
    the disk reads right and the mount stays up."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    snap = store / "h" / "2026-11-01"
    snap.mkdir(parents=True)
    mnt.mkdir()
    raw = tmp_path / "src.raw"
    raw.write_bytes(random.Random(5).randbytes(4 * MiB))
    image = snap / "disk0.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    data = bytearray(image.read_bytes())
    l1 = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1 : l1 + 8], "big") & 0x00FF_FFFF_FFFF_FE00
    data[l2 + 8 : l2 + 16] = ((1 << 63) | (1 << 40)).to_bytes(8, "big")  # cluster 1: far away
    image.write_bytes(bytes(data))
    indexed = run_cli("index", str(store))
    assert indexed.returncode == 0, indexed.stderr
    truth = raw.read_bytes()
    with Nginx(store, tmp_path / "nginx") as nginx, mounted(nginx.url, mnt):
        disk = mnt / "h" / "2026-11-01" / "disk0.img"
        with open(disk, "rb") as f:
            with pytest.raises(OSError) as info:
                os.pread(f.fileno(), 4096, 65536 + 100)
            assert info.value.errno == 5  # EIO
            assert os.pread(f.fileno(), 65536, 0) == truth[:65536]
            assert os.pread(f.fileno(), MiB, 2 * MiB) == truth[2 * MiB : 3 * MiB]
        assert read_stats(mnt)["bytes_fetched"] > 0  # the mount still answers


@needs_filesystems("ext4")
def test_warm_metadata_on_the_top_of_the_chain_makes_a_listing_cheap(
    chain: Chain, served: Path, tmp_path: Path
) -> None:
    """`warm --metadata` reads the filesystem's metadata at virtual offsets of the top
    image: they become reads of the stored files down the chain, and `ls -lR` then needs
    nothing more from the store."""
    env = attach_env(tmp_path / "run")
    with attached(served / "web01" / SNAPS[2] / "disk0.img", tmp_path / "target", env) as att:
        before = read_stats(served)
        result = run_cli("warm", "--metadata", str(att.target / "p0"), env=env)
        assert result.returncode == 0, result.stderr
        warmed = read_stats(served)
        assert warmed["bytes_fetched"] > before["bytes_fetched"], result.stdout
        listing = subprocess.run(["ls", "-lR", str(att.target / "p0")], capture_output=True,
                                 text=True, timeout=120)  # fmt: skip
        assert listing.returncode == 0 and "new-in-s3.bin" in listing.stdout
        assert read_stats(served)["bytes_fetched"] == warmed["bytes_fetched"]
