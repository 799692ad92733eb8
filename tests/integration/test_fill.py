"""The background fill (fill=auto) through a real mount and nginx, behind a proxy that
records every ranged GET: metadata (the root directory's inode) is asked for before a
file's data, the blocks of a deleted file (free, but not zeros) and the disk's holes are
never asked for, the filled bytes are in the kernel's page cache (reading them again
fetches nothing), a demand read through a slow link completes while the fill still runs,
and fill=off fetches only what is read."""

import hashlib
import mmap
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backupfs.store.indexer import index_store
from tests.support.attachment import attach_env, attached
from tests.support.fsimages import run_tool, sparse_copy
from tests.support.kernel import needs_filesystems
from tests.support.mounting import mounted, read_stats, run_cli
from tests.support.nginx import Nginx
from tests.support.proxy import DelayProxy, FaultProxy
from tests.support.trees import make_tree

MiB = 1 << 20
PART_START, FS_MIB, DISK_MIB = MiB, 64, 128  # then a hole, and the backup GPT at the end
REL = "web01/2026-11-20T0300Z/disk0.img"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
pytestmark = needs_filesystems("ext4")


def _blocks(fs: Path, path: str) -> list[int]:
    out = run_tool(["debugfs", "-R", f"blocks {path}", str(fs)])
    return [int(b) for b in out.split()]


def _disk(store: Path, work: Path) -> dict[str, list[int]]:
    """The disk, and the block numbers (4 KiB, from the filesystem's start) of the
    root inode's table block, a kept file's data and a deleted file's old data."""
    tree = work / "tree"
    make_tree(tree, seed=3, files=20, special=False)
    (tree / "keep.bin").write_bytes(os.urandom(8 * MiB))
    (tree / "gone.bin").write_bytes(os.urandom(16 * MiB))
    fs = work / "fs.ext4"
    run_tool(["truncate", "-s", f"{FS_MIB}M", str(fs)])
    run_tool(["mkfs.ext4", "-q", "-b", "4096", "-d", str(tree), str(fs)])
    found = {"keep": _blocks(fs, "/keep.bin"), "gone": _blocks(fs, "/gone.bin")}
    imap = run_tool(["debugfs", "-R", "imap <2>", str(fs)])
    found["root"] = [int(re.search(r"located at block (\d+)", imap)[1])]  # type: ignore[index]
    run_tool(["debugfs", "-w", "-R", "rm /gone.bin", str(fs)])  # freed, its data stays
    disk = store / REL
    disk.parent.mkdir(parents=True)
    run_tool(["truncate", "-s", f"{DISK_MIB}M", str(disk)])
    script = f"label: gpt\nstart={PART_START // 512}, size={FS_MIB * MiB // 512}, type={LINUX}\n"
    run_tool(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)], stdin=script)
    sparse_copy(fs, disk, PART_START)
    index_store(store, say=lambda _: None)
    return found


def _ranges(proxy: FaultProxy) -> list[tuple[int, int]]:
    """[start, end) of each GET of the disk, in the order the proxy saw them."""
    out = []
    for path, header in proxy.log:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", header or "")
        if path.endswith(REL) and m:
            out.append((int(m[1]), int(m[2]) + 1))
    return out


def _touches(ranges: list[tuple[int, int]], blocks: list[int]) -> list[int]:
    """Indices of the ranges that hold any of `blocks`."""
    at = [PART_START + b * 4096 for b in blocks]
    return [i for i, (lo, hi) in enumerate(ranges) if any(lo <= a < hi for a in at)]


def _wait_done(mnt: Path, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = read_stats(mnt)
        if stats["fills_done"] >= 1:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"the fill did not end within {timeout_s}s: {read_stats(mnt)}")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Path, dict[str, list[int]], Nginx]]:
    (tmp_path / "work").mkdir()
    found = _disk(tmp_path / "store", tmp_path / "work")
    with Nginx(tmp_path / "store", tmp_path / "nginx") as nginx:
        yield tmp_path / "store", found, nginx


def test_the_fill_reads_metadata_first_never_free_space_or_holes_and_lands_in_the_page_cache(
    store: tuple[Path, dict[str, list[int]], Nginx], tmp_path: Path
) -> None:
    root, found, nginx = store
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with FaultProxy(nginx.port) as proxy, mounted(proxy.url, mnt, "fill=auto"):
        with open(mnt / REL, "rb") as f:
            f.read(4096)  # the first read of the disk starts its fill
        stats = _wait_done(mnt)
        ranges = _ranges(proxy)
        assert stats["fill_metadata_bytes"] > 0 and stats["fill_bytes"] > 8 * MiB, stats
        root_reads, keep_reads = _touches(ranges, found["root"]), _touches(ranges, found["keep"])
        assert root_reads and keep_reads, ranges
        assert min(root_reads) < min(keep_reads), ranges
        assert _touches(ranges, found["gone"]) == [], "a deleted file's blocks were fetched"
        fs_end, gpt_backup = PART_START + FS_MIB * MiB, DISK_MIB * MiB - 64 * 1024
        assert all(hi <= fs_end or lo >= gpt_backup for lo, hi in ranges), "a hole was fetched"
        fetched = stats["bytes_fetched"]
        data = (root / REL).read_bytes()
        with open(mnt / REL, "rb") as f:  # the kernel has the filled pages: no new GET
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # and reads no more
            for block in found["keep"]:
                at = PART_START + block * 4096
                f.seek(at)
                assert f.read(4096) == data[at : at + 4096]
        assert read_stats(mnt)["bytes_fetched"] == fetched


def test_a_demand_read_goes_first_on_a_slow_link_and_fill_off_reads_only_what_is_read(
    store: tuple[Path, dict[str, list[int]], Nginx], tmp_path: Path
) -> None:
    root, found, nginx = store
    data = (root / REL).read_bytes()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    far = PART_START + found["keep"][-1] * 4096
    with DelayProxy(nginx.port, rtt_ms=20, rate_mbit=16) as slow, mounted(slow.url, mnt,
                                                                          "fill=auto"):  # fmt: skip
        with open(mnt / REL, "rb", buffering=0) as f:
            f.read(4096)
            while read_stats(mnt)["fill_bytes"] == 0:  # the data pass is running
                time.sleep(0.05)
            fd = os.open(mnt / REL, os.O_RDONLY | os.O_DIRECT)
            try:
                got = _direct_read(fd, far)
            finally:
                os.close(fd)
        assert got == data[far : far + 4096]
        stats = read_stats(mnt)
        assert stats["fills_done"] == 0, "the fill ended before the demand read: no test"
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    with mounted(nginx.url, mnt2, "fill=off"):
        with open(mnt2 / REL, "rb") as f:
            f.read(4096)
        time.sleep(1)
        stats = read_stats(mnt2)
        assert stats["fills_started"] == 0 and stats["fill_bytes"] == 0
        assert stats["bytes_fetched"] <= 2 * MiB, stats  # a block or two, and readahead none


def _direct_read(fd: int, offset: int) -> bytes:
    """4 KiB at `offset` with O_DIRECT: past the page cache, straight to the daemon."""
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    os.preadv(fd, [buf], offset)
    return bytes(buf)


def test_a_restore_after_the_fill_fetches_nothing_again(
    store: tuple[Path, dict[str, list[int]], Nginx], tmp_path: Path
) -> None:
    """What the fill pushed is in the kernel's page cache: a restore's read plan does not
    fetch it a second time (the restore's reads are page cache hits)."""
    root, _, nginx = store
    mnt, target, dest = tmp_path / "mnt", tmp_path / "att", tmp_path / "dest"
    mnt.mkdir()
    env = attach_env(tmp_path / "run")
    with mounted(nginx.url, mnt, "fill=auto"):
        with open(mnt / REL, "rb") as f:
            f.read(4096)
        fetched = _wait_done(mnt)["bytes_fetched"]
        with attached(mnt / REL, target, env, "--clones", "1"):
            result = run_cli("restore", str(target / "p1" / "keep.bin"), str(dest), env=env)
            assert result.returncode == 0, result.stderr
            stats = read_stats(mnt)
    source = tmp_path / "work" / "tree" / "keep.bin"
    assert (
        hashlib.sha256((dest / "keep.bin").read_bytes()).digest()
        == hashlib.sha256(source.read_bytes()).digest()
    )
    assert stats["plan_bytes"] == 0 and stats["bytes_fetched"] - fetched < 256 << 10, stats
