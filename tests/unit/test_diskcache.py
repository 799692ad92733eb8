"""The persistent block store in backupfs.readpath.diskcache, on real files (tmpfs mounts for the
full-disk and read-only cases, which need root)."""

import hashlib
import logging
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from backupfs.errors import UserError
from backupfs.readpath.diskcache import DiskCache
from tests.support.system import tmpfs_mounted

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")


def block(n: int, size: int = 1000) -> tuple[bytes, bytes]:
    data = hashlib.sha256(str(n).encode()).digest() * (size // 32 + 1)
    data = data[:size]
    return hashlib.sha256(data).digest(), data


def files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "v1").rglob("*") if not p.is_dir() or p.is_symlink())


def entry_path(root: Path, digest: bytes) -> Path:
    return root / "v1" / digest.hex()[:2] / digest.hex()


def tmpfs(mnt: Path, size: str) -> AbstractContextManager[Path]:
    return tmpfs_mounted(mnt, f"size={size},mode=0700")


def test_round_trip_and_layout(tmp_path: Path) -> None:
    root = tmp_path / "a" / "cache"
    cache = DiskCache(root, 1 << 20)
    digest, data = block(1)
    assert cache.get(digest) is None
    cache.put(digest, data)
    assert cache.get(digest) == data
    assert files(root) == [entry_path(root, digest)]
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert (root / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172")
    assert cache.bytes_used == len(data)
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_survives_remount(tmp_path: Path) -> None:
    first = DiskCache(tmp_path, 1 << 20)
    blocks = [block(n, size=100 + n) for n in range(5)]
    for digest, data in blocks:
        first.put(digest, data)
    second = DiskCache(tmp_path, 1 << 20)
    assert second.bytes_used == first.bytes_used == sum(len(d) for _, d in blocks)
    for digest, data in blocks:
        assert second.get(digest) == data


def test_identical_content_is_stored_once(tmp_path: Path) -> None:
    digest, data = block(7)
    one, two = DiskCache(tmp_path, 1 << 20), DiskCache(tmp_path, 1 << 20)
    one.put(digest, data)
    one.put(digest, data)
    two.put(digest, data)
    assert files(tmp_path) == [entry_path(tmp_path, digest)]
    assert one.bytes_used == len(data)
    assert two.bytes_used == 0  # found it there: wrote nothing
    assert DiskCache(tmp_path, 1 << 20).bytes_used == len(data)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]),
        lambda p: os.truncate(p, 999),
        lambda p: os.truncate(p, 0),
    ],
    ids=["flipped byte", "truncated", "empty"],
)
def test_damaged_entry_is_a_miss_and_removed(
    tmp_path: Path, damage: Callable[[Path], object], caplog: pytest.LogCaptureFixture
) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    digest, data = block(1)
    cache.put(digest, data)
    damage(entry_path(tmp_path, digest))
    with caplog.at_level(logging.WARNING, logger="backupfs.readpath.diskcache"):
        assert cache.get(digest) is None
        assert cache.get(digest) is None
    assert files(tmp_path) == []
    assert cache.stats.corrupt == 1
    assert len(caplog.records) == 1
    assert "wrong SHA-256" in caplog.records[0].getMessage()
    cache.put(digest, data)  # fetched again over HTTP and stored again
    assert cache.get(digest) == data


def test_unreadable_entries_are_misses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    (d_dir, _), (d_link, data), (d_fifo, _) = block(1), block(2), block(3)
    entry_path(tmp_path, d_dir).mkdir(parents=True)  # open: EISDIR, and unlink fails
    target = tmp_path / "elsewhere"
    target.write_bytes(data)
    entry_path(tmp_path, d_link).parent.mkdir(parents=True, exist_ok=True)
    entry_path(tmp_path, d_link).symlink_to(target)  # right bytes, but never followed
    entry_path(tmp_path, d_fifo).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(entry_path(tmp_path, d_fifo))  # must not block
    with caplog.at_level(logging.WARNING, logger="backupfs.readpath.diskcache"):
        for digest in (d_dir, d_link, d_fifo, d_dir):
            assert cache.get(digest) is None
    assert cache.stats.corrupt == 4
    assert len(caplog.records) == 3  # once per entry
    assert files(tmp_path) == []
    assert entry_path(tmp_path, d_dir).is_dir()
    assert target.read_bytes() == data


def test_eviction_keeps_the_bound_and_drops_least_recently_used(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 10_000)
    blocks = [block(n) for n in range(11)]
    for digest, data in blocks[:10]:
        cache.put(digest, data)
    assert cache.bytes_used == 10_000
    assert cache.get(blocks[0][0]) == blocks[0][1]  # now the most recently used but one
    cache.put(*blocks[10])  # 11_000 > 10_000: evict down to 9_000
    assert cache.bytes_used == 9_000
    assert cache.stats.evicted == 2
    assert sum(p.stat().st_size for p in files(tmp_path)) == 9_000
    kept = [n for n, (digest, _) in enumerate(blocks) if entry_path(tmp_path, digest).exists()]
    assert kept == [0, 3, 4, 5, 6, 7, 8, 9, 10]


def test_eviction_counts_other_processes_entries(tmp_path: Path) -> None:
    one, two = DiskCache(tmp_path, 10_000), DiskCache(tmp_path, 10_000)
    blocks = [block(n) for n in range(17)]
    for digest, data in blocks[:6]:
        one.put(digest, data)
    for digest, data in blocks[6:]:
        two.put(digest, data)  # two alone only sees 11_000 at the last put
    on_disk = sum(p.stat().st_size for p in files(tmp_path))
    assert on_disk <= 10_000
    assert two.bytes_used == on_disk
    assert not any(entry_path(tmp_path, d).exists() for d, _ in blocks[:6])
    for digest, _ in blocks[:6]:
        assert one.get(digest) is None  # evicted by the other: a plain miss
    assert one.stats.corrupt == 0


def test_smaller_size_evicts_at_start(tmp_path: Path) -> None:
    big = DiskCache(tmp_path, 1 << 20)
    for n in range(20):
        big.put(*block(n))
    small = DiskCache(tmp_path, 5_000)
    assert small.bytes_used <= 4_500
    assert sum(p.stat().st_size for p in files(tmp_path)) == small.bytes_used


def test_oversized_block_is_not_stored(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 999)
    cache.put(*block(1))
    assert files(tmp_path) == []


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"^cache_dir .*/f is not a directory$"):
        DiskCache(tmp_path / "f", 1 << 20)
    with pytest.raises(UserError, match=r"^cache_dir .*/f/sub: Not a directory$"):
        DiskCache(tmp_path / "f" / "sub", 1 << 20)


@needs_root
def test_root_writable_by_others_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    os.chown(root, 65534, 65534)
    root.chmod(0o777)
    with pytest.raises(UserError, match="writable by other users and not owned by you$"):
        DiskCache(root, 1 << 20)
    root.chmod(0o755)  # someone else's: its owner could plant entries, so root refuses it too
    with pytest.raises(UserError, match="is owned by uid 65534: root uses only its own$"):
        DiskCache(root, 1 << 20)


@needs_root
def test_full_disk_degrades_to_read_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "tiny", "1m") as mnt:
        cache = DiskCache(mnt / "cache", 64 << 20)
        blocks = [block(n, size=256 << 10) for n in range(10)]
        with caplog.at_level(logging.WARNING, logger="backupfs.readpath.diskcache"):
            for digest, data in blocks:
                cache.put(digest, data)
        stored = [(d, data) for d, data in blocks if entry_path(mnt / "cache", d).exists()]
        assert 1 <= len(stored) < len(blocks)
        assert cache.stats.write_errors == len(blocks) - len(stored)
        assert len(caplog.records) == 1
        assert "No space left on device" in caplog.records[0].getMessage()
        assert sorted(p.name for p in files(mnt / "cache")) == sorted(d.hex() for d, _ in stored)
        for digest, data in stored:
            assert cache.get(digest) == data
        assert cache.bytes_used == sum(len(data) for _, data in stored)


@needs_root
def test_read_only_root_degrades_to_no_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tmpfs(tmp_path / "ro", "4m") as mnt:
        cache = DiskCache(mnt / "cache", 1 << 20)
        (d1, data1), (d2, data2), (d3, data3) = block(1), block(2), block(3)
        cache.put(d1, data1)
        cache.put(d2, data2)
        entry_path(mnt / "cache", d2).write_bytes(b"garbage")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, timeout=30)
        with caplog.at_level(logging.WARNING, logger="backupfs.readpath.diskcache"):
            cache.put(d3, data3)
            cache.put(d3, data3)
            cache.put(d1, data1)  # already there: not an error
            assert cache.get(d1) == data1
            assert cache.get(d2) is None  # cannot be removed, still never returned
            assert cache.get(d3) is None
        assert cache.stats.write_errors == 2
        assert "Read-only file system" in caplog.records[0].getMessage()
        with pytest.raises(UserError, match=r"^cache_dir .*/cache is not writable$"):
            DiskCache(mnt / "cache", 1 << 20)


def test_eviction_deletes_only_files_named_like_entries(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / "v1" / "ab").mkdir(parents=True)
    stray = root / "v1" / "ab" / "notes.txt"
    stray.write_bytes(b"x" * 5000)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ("cd" + "0" * 62)).write_bytes(b"y" * 5000)
    (root / "v1" / "cd").symlink_to(elsewhere)  # a fan-out directory is never followed
    cache = DiskCache(root, 3_000)
    assert cache.bytes_used == 0
    for n in range(5):
        cache.put(*block(n))
    assert cache.bytes_used <= 3_000
    assert stray.read_bytes() == b"x" * 5000
    assert (elsewhere / ("cd" + "0" * 62)).read_bytes() == b"y" * 5000


def test_concurrent_writers_and_evictors_never_return_wrong_bytes(tmp_path: Path) -> None:
    caches = [DiskCache(tmp_path, 20_000) for _ in range(4)]  # like four mounts
    blocks = [block(n) for n in range(60)]
    errors: list[BaseException] = []

    def work(cache: DiskCache, seed: int) -> None:
        try:
            for i in range(300):
                digest, data = blocks[(seed * 7 + i * 13) % len(blocks)]
                got = cache.get(digest)
                assert got is None or got == data
                if got is None:
                    cache.put(digest, data)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(caches[n % 4], n)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert [(c.stats.corrupt, c.stats.write_errors) for c in caches] == [(0, 0)] * 4
    # Each cache overshoots by at most what it writes between scans (an eighth of the
    # size), plus the blocks its two threads write while another evicts.
    assert sum(p.stat().st_size for p in files(tmp_path)) <= 20_000 + 4 * (20_000 // 8 + 2000)


def test_stale_temporary_files_are_evicted_fresh_ones_kept(tmp_path: Path) -> None:
    (tmp_path / "v1" / "ab").mkdir(parents=True)
    stale, fresh = tmp_path / "v1" / "ab" / ".tmp-crashed", tmp_path / "v1" / "ab" / ".tmp-now"
    stale.write_bytes(b"s" * 3000)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    fresh.write_bytes(b"f" * 3000)  # another mount is writing it
    cache = DiskCache(tmp_path, 2_000)
    assert not stale.exists()
    assert fresh.exists()
    assert cache.bytes_used == 0
