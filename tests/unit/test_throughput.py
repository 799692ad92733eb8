"""readpath.throughput.Throughput: bytes over busy time, idle gaps left out, forgotten after
its window."""

from backupfs.readpath.throughput import Throughput

MiB = 1 << 20


def test_rate_counts_busy_time_only() -> None:
    meter = Throughput(window_s=4.0, min_bytes=MiB)
    assert meter.rate(0.0) is None
    meter.record(0.0, 1.0, MiB)  # 1 MiB/s while busy...
    meter.record(2.0, 3.0, MiB)  # ...with an idle second between
    assert meter.rate(3.0) == MiB  # 2 MiB in 2 busy seconds, not in 3 wall seconds
    meter.record(2.5, 3.5, MiB)  # overlapping fetches: the union of their intervals
    assert meter.rate(3.5) == 3 * MiB / 2.5


def test_too_little_or_too_old_gives_no_estimate() -> None:
    meter = Throughput(window_s=4.0, min_bytes=MiB)
    meter.record(0.0, 1.0, MiB // 2)
    assert meter.rate(1.0) is None
    meter.record(1.0, 2.0, MiB)
    assert meter.rate(2.0) is not None
    assert meter.rate(6.5) is None  # nothing completed in the last 4 s
