"""Intermittent stalls: every other reply (data and digests) goes silent for longer than
`timeout=`. Every read, buffered or O_DIRECT, returns the right bytes or EIO, within the
bound the README gives: (retries + 1) x timeout + 4 s x retries + 10 s."""

import errno
import mmap
import os
import random
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import BIG, BIG_SIZE, Store
from tests.support.mounting import mounted
from tests.support.proxy import FaultProxy

TIMEOUT_S, RETRIES = 2, 3
BOUND_S = (RETRIES + 1) * TIMEOUT_S + 4 * RETRIES + 10  # 30 s
SLACK_S = 5  # a buffered read may wait for a readahead request of the kernel's as well
READ = 128 << 10
READS_PER_THREAD = 6


def _reader(
    mnt: Path, store: Store, flags: int, seed: int, outcomes: list[tuple[str, float]]
) -> None:
    rng = random.Random(seed)
    with open(store.path(BIG), "rb") as src:
        fd = os.open(mnt / BIG, os.O_RDONLY | flags)
        try:
            for _ in range(READS_PER_THREAD):
                offset = rng.randrange(0, BIG_SIZE - READ) // 4096 * 4096
                buf: bytearray | memoryview = _aligned(READ) if flags else bytearray(READ)
                started = time.monotonic()
                try:
                    got = os.preadv(fd, [buf], offset)
                    want = os.pread(src.fileno(), READ, offset)
                    kind = "ok" if bytes(buf[:got]) == want else "WRONG"
                except OSError as exc:
                    kind = "eio" if exc.errno == errno.EIO else f"errno {exc.errno}"
                outcomes.append((kind, time.monotonic() - started))
        finally:
            os.close(fd)


def _aligned(size: int) -> memoryview:
    """A page-aligned buffer for O_DIRECT (an anonymous mmap is page-aligned)."""
    return memoryview(mmap.mmap(-1, size))


@pytest.mark.parametrize("flags", [0, os.O_DIRECT], ids=["buffered", "O_DIRECT"])
def test_every_read_ends_within_the_bound_under_intermittent_stalls(
    flags: int, store: Store, mnt: Path, fault_proxy: FaultProxy
) -> None:
    with mounted(fault_proxy.url, mnt, f"timeout={TIMEOUT_S}", f"retries={RETRIES}"):
        with open(mnt / BIG, "rb"):  # the digests' index is loaded before the stalls
            pass
        fault_proxy.add_fault(
            "stall", count=10_000, path_contains="disk0.img", stall_s=3 * TIMEOUT_S, every=2
        )
        outcomes: list[tuple[str, float]] = []
        threads = [
            threading.Thread(target=_reader, args=(mnt, store, flags, seed, outcomes))
            for seed in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=READS_PER_THREAD * (BOUND_S + SLACK_S) + 30)
        assert not any(t.is_alive() for t in threads), "a read did not end"
        fault_proxy.clear_faults()
    kinds = [kind for kind, _ in outcomes]
    assert len(outcomes) == 4 * READS_PER_THREAD
    assert set(kinds) <= {"ok", "eio"}, outcomes  # never a wrong byte, never another error
    assert kinds.count("ok") >= len(kinds) // 2, outcomes  # stalls are retried, not fatal
    slowest = max(seconds for _, seconds in outcomes)
    assert slowest <= BOUND_S + SLACK_S, outcomes
