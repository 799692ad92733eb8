"""Faults injected between the mount and a real nginx: correct bytes or EIO, never wrong bytes."""

import errno
import os
import time
from pathlib import Path

import pytest

from backupfs.readpath.blocks import ReaderConfig
from tests.integration.conftest import BIG, Store
from tests.support.mounting import mounted, read_stats
from tests.support.proxy import FaultProxy

FAST_FAILING = ("timeout=2", "retries=3")
FAILED_TTL_S = ReaderConfig().failed_ttl_s
MiB = 1 << 20


def _read_both(store: Store, mnt: Path, offset: int, size: int = MiB) -> tuple[bytes, bytes]:
    with open(store.path(BIG), "rb") as src, open(mnt / BIG, "rb") as f:
        return os.pread(f.fileno(), size, offset), os.pread(src.fileno(), size, offset)


@pytest.mark.parametrize(
    "kind", ["status503", "reset", "truncate", "corrupt", "wrong_range", "stall"]
)
def test_transient_faults_are_retried(
    kind: str, store: Store, mnt: Path, fault_proxy: FaultProxy
) -> None:
    with mounted(fault_proxy.url, mnt, *FAST_FAILING):
        with open(mnt / BIG, "rb"):  # load the digests before faults are armed
            pass
        fault_proxy.add_fault(kind, count=2, path_contains="disk0.img", stall_s=30)  # type: ignore[arg-type]
        got, want = _read_both(store, mnt, 100 * MiB)
        assert got == want
        assert fault_proxy.faults_left() == 0


@pytest.mark.parametrize("kind", ["corrupt", "status503", "reset", "ignore_range"])
def test_persistent_faults_give_eio_then_the_mount_recovers(
    kind: str, store: Store, mnt: Path, fault_proxy: FaultProxy
) -> None:
    with mounted(fault_proxy.url, mnt, *FAST_FAILING):
        with open(mnt / BIG, "rb"):
            pass
        fault_proxy.add_fault(kind, count=10_000, path_contains="disk0.img")  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            _read_both(store, mnt, 50 * MiB)
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - started < 60
        fault_proxy.clear_faults()
        # Right after, the blocks that failed on their own fail at once: the kernel's
        # page-by-page retries do not each start a new chain of attempts...
        started = time.monotonic()
        with pytest.raises(OSError) as again:
            _read_both(store, mnt, 50 * MiB)
        assert again.value.errno == errno.EIO and time.monotonic() - started < 2
        # ...and once that memory has expired the range is read again.
        time.sleep(FAILED_TTL_S + 0.2)
        for offset in (50 * MiB, 150 * MiB):
            got, want = _read_both(store, mnt, offset)
            assert got == want


def test_a_stalled_server_times_out_with_eio(
    store: Store, mnt: Path, fault_proxy: FaultProxy
) -> None:
    with mounted(fault_proxy.url, mnt, "timeout=1", "retries=1"):
        with open(mnt / BIG, "rb"):
            pass
        fault_proxy.add_fault("stall", count=100, path_contains="disk0.img", stall_s=60)
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            _read_both(store, mnt, 200 * MiB)
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - started < 20
        fault_proxy.clear_faults()
        time.sleep(FAILED_TTL_S + 0.2)  # blocks that failed on their own fail fast until then
        got, want = _read_both(store, mnt, 200 * MiB)
        assert got == want


def test_mixed_faults_never_yield_wrong_bytes(
    store: Store, mnt: Path, fault_proxy: FaultProxy
) -> None:
    kinds = ["corrupt", "truncate", "reset", "wrong_range", "status503", "corrupt"]
    outcomes = {"ok": 0, "eio": 0}
    with mounted(fault_proxy.url, mnt, "timeout=2", "retries=1"):
        with open(mnt / BIG, "rb"):
            pass
        for i in range(24):
            fault_proxy.add_fault(kinds[i % len(kinds)], count=1 + i % 3, path_contains="disk0.img")  # type: ignore[arg-type]
            try:
                got, want = _read_both(store, mnt, (i * 9 + 3) * MiB, 256 * 1024)
            except OSError as exc:
                assert exc.errno == errno.EIO
                outcomes["eio"] += 1
            else:
                assert got == want, f"wrong bytes at read {i}"
                outcomes["ok"] += 1
            fault_proxy.clear_faults()
    assert outcomes["ok"] > 0


@pytest.mark.parametrize("part", ["index", "chunk"])
def test_a_corrupted_digest_transfer_is_fetched_again(
    part: str, store: Store, mnt: Path, fault_proxy: FaultProxy
) -> None:
    """The chunk index is fetched when the disk is opened, each chunk of records by range
    when a read first needs it: a flipped byte in either is fetched again."""
    with mounted(fault_proxy.url, mnt, *FAST_FAILING):
        if part == "chunk":
            with open(mnt / BIG, "rb"):  # the index only
                pass
        fault_proxy.add_fault("corrupt", count=1, path_contains=".backupfs/")
        got, want = _read_both(store, mnt, 7 * MiB)
        assert got == want
        assert fault_proxy.faults_left() == 0
        assert read_stats(mnt)["verify_failures"] == 1
