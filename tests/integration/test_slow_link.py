"""A healthy but slow link (10 Mbit/s, RTT 20 ms) with default options: reads succeed with
no attempt thrown away, and what crosses the link is what was read. How close to the link
rate this gets is measured by bench/slowlink.py, not here."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import BIG, Store
from tests.support.mounting import mounted, read_stats
from tests.support.proxy import DelayProxy

LINK_MBIT = 10.4  # 1.3 MB/s: below 2.2 MB/s every 4 MiB attempt used to time out
READ_MIB = 32


@pytest.fixture
def slow_url(store: Store) -> Iterator[tuple[str, DelayProxy]]:
    port = int(store.url.rsplit(":", 1)[1].strip("/"))
    with DelayProxy(port, rtt_ms=20, rate_mbit=LINK_MBIT) as proxy:
        yield proxy.url, proxy


def _expected(store: Store) -> str:
    with open(store.path(BIG), "rb") as f:
        return hashlib.sha256(f.read(READ_MIB << 20)).hexdigest()


# Bytes on the wire per byte read. A buffered reader also has the kernel's readahead
# (1 MiB) in flight when it stops, on top of the daemon's (a second of the link).
@pytest.mark.parametrize(
    ("flags", "most"), [(["iflag=direct"], 1.05), ([], 1.10)], ids=["O_DIRECT", "buffered"]
)
def test_a_slow_link_delivers_what_is_read_and_nothing_else(
    store: Store, mnt: Path, slow_url: tuple[str, DelayProxy], flags: list[str], most: float
) -> None:
    url, proxy = slow_url
    with mounted(url, mnt):
        before = proxy.bytes_down  # catalogue and the Range probe
        dd = subprocess.run(
            ["dd", f"if={mnt / BIG}", "of=/dev/stdout", "bs=1M", f"count={READ_MIB}", *flags],
            capture_output=True, timeout=300,
        )  # fmt: skip
        assert dd.returncode == 0, dd.stderr
        assert hashlib.sha256(dd.stdout).hexdigest() == _expected(store)
        stats = read_stats(mnt)
        on_the_wire = proxy.bytes_down - before  # the digest file, the data, the headers
    assert stats["retries"] == 0 and stats["read_errors"] == 0, stats
    assert on_the_wire <= most * (READ_MIB << 20), (on_the_wire, stats)
