"""The hidden control file MNT/.backupfs/stats and `backupfs stats`."""

import contextlib
import errno
import json
import os
import time
from pathlib import Path

import pytest

from tests.integration.conftest import BIG, Store
from tests.support.mounting import mounted, read_stats, run_cli


def _pread_uncached(path: Path, offset: int, size: int) -> bytes:
    """Read through to the daemon: drop the kernel's page cache for the file first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def test_second_read_of_a_range_is_a_cache_hit(store: Store, mnt: Path) -> None:
    offset, size = 100 << 20, 64 << 10
    with open(store.path(BIG), "rb") as f:
        f.seek(offset)
        expected = f.read(size)
    with mounted(store.url, mnt, "cache_size=128M"):
        before = read_stats(mnt)
        assert before["bytes_fetched"] == 0 and before["blocks_in_cache"] == 0
        assert _pread_uncached(mnt / BIG, offset, size) == expected
        first = read_stats(mnt)
        assert first["cache_misses"] > before["cache_misses"]
        assert first["bytes_fetched"] >= size and first["blocks_in_cache"] >= 1
        assert first["bytes_served"] >= size and first["fetch_p50_ms"] is not None
        assert _pread_uncached(mnt / BIG, offset, size) == expected
        second = read_stats(mnt)
        assert second["cache_hits"] > first["cache_hits"]
        assert second["cache_misses"] == first["cache_misses"]
        assert second["bytes_fetched"] == first["bytes_fetched"]
        assert second["bytes_served"] > first["bytes_served"]
        assert second["requests_in_flight"] == 0 and second["verify_failures"] == 0


def test_control_dir_is_hidden_and_read_only(store: Store, mnt: Path) -> None:
    with mounted(store.url, mnt):
        assert ".backupfs" not in os.listdir(mnt)
        assert sorted(os.listdir(mnt / ".backupfs")) == ["metrics", "stats", "volumes"]
        assert os.stat(mnt / ".backupfs" / "stats").st_size > 0
        with pytest.raises(OSError) as err:
            open(mnt / ".backupfs" / "stats", "w")  # noqa: SIM115
        assert err.value.errno in (errno.EROFS, errno.EACCES)
        assert not (mnt / ".backupfs" / "nothing").exists()
        assert not (mnt / "web01" / ".backupfs").exists()


def test_readahead_window_shows_while_a_file_is_open(store: Store, mnt: Path) -> None:
    with mounted(store.url, mnt), open(mnt / BIG, "rb", buffering=0) as f:
        for _ in range(16):
            f.read(1 << 20)
        doc = read_stats(mnt)
        assert doc["readahead_windows"] and max(doc["readahead_windows"]) >= 1 << 20
        assert max(doc["readahead_windows"]) <= doc["readahead_max_bytes"]


def test_readahead_follows_a_stream_spread_over_handles(store: Store, mnt: Path) -> None:
    """Three handles read the image's MiBs in turn (as parallel readers of one loop
    device's clones do): no handle reads sequentially, the image is read sequentially,
    and that is the stream readahead follows."""
    with mounted(store.url, mnt), contextlib.ExitStack() as stack:
        fds = [os.open(mnt / BIG, os.O_RDONLY) for _ in range(3)]
        for fd in fds:
            stack.callback(os.close, fd)
        with open(store.path(BIG), "rb") as f:
            for n in range(24):
                assert os.pread(fds[n % 3], 1 << 20, n << 20) == f.read(1 << 20)
        doc = read_stats(mnt)
        assert doc["readahead_windows"] and max(doc["readahead_windows"]) >= 1 << 20
        deadline = time.monotonic() + 10  # readahead may still be in flight: wait for it
        while doc["bytes_fetched"] <= 26 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
            doc = read_stats(mnt)
        assert doc["bytes_fetched"] > 26 << 20  # fetched ahead of the readers


def test_backupfs_stats_command(store: Store, mnt: Path) -> None:
    with mounted(store.url, mnt):
        (mnt / BIG).open("rb").read(1 << 20)
        human = run_cli("stats", str(mnt))
        assert human.returncode == 0, human.stderr
        assert human.stdout.startswith(f"store            {store.url}")
        assert "hits" in human.stdout and "p50" in human.stdout
        raw = run_cli("stats", "--json", str(mnt))
        assert raw.returncode == 0 and json.loads(raw.stdout)["bytes_served"] >= 1 << 20
    gone = run_cli("stats", str(mnt))
    assert gone.returncode == 1
    assert gone.stderr == f"backupfs: {mnt} is not a backupfs mount\n"
