"""Sequential-stream detection and readahead windows of readpath.readahead.StreamTracker."""

import random

from hypothesis import given
from hypothesis import strategies as st

from backupfs.readpath.readahead import ReadaheadConfig, StreamTracker

KiB = 1 << 10
MiB = 1 << 20
READ = 128 * KiB


def _sequential(tracker: StreamTracker, start: int, count: int, size: int = READ) -> list:
    """(read_end, prefetch or None) for `count` back-to-back reads from `start`."""
    out = []
    for i in range(count):
        offset = start + i * size
        out.append((offset + size, tracker.on_read(offset, size)))
    return out


def _check_prefetches(results: list, max_bytes: int) -> list[tuple[int, int]]:
    """Prefetch ranges are ahead of the reader, non-empty, bounded, ascending, disjoint."""
    ranges = []
    for read_end, ahead in results:
        if ahead is None:
            continue
        start, end = ahead
        assert read_end <= start < end
        assert end - start <= max_bytes
        if ranges:
            assert start >= ranges[-1][1]  # no overlap, never backwards
        ranges.append(ahead)
    return ranges


def test_defaults() -> None:
    config = ReadaheadConfig()
    assert config.initial_bytes == 1 * MiB
    assert config.max_bytes == 64 * MiB
    assert config.slack_bytes == 1 * MiB
    assert config.max_streams == 8


def test_first_read_never_prefetches_second_does() -> None:
    tracker = StreamTracker(ReadaheadConfig())
    assert tracker.on_read(0, READ) is None
    assert tracker.on_read(READ, READ) == (2 * READ, 2 * READ + 1 * MiB)


def test_sequential_stream_windows_double_up_to_max() -> None:
    config = ReadaheadConfig(max_bytes=16 * MiB)
    tracker = StreamTracker(config)
    results = []
    windows = []  # the stream's window after each read that prefetched
    for i in range(2000):
        ahead = tracker.on_read(i * READ, READ)
        results.append(((i + 1) * READ, ahead))
        if ahead is not None:
            windows.append(tracker.streams[0].window)
            # The reader's head plus the window is exactly where prefetch now ends.
            assert ahead[1] == (i + 1) * READ + windows[-1]
    assert results[0][1] is None
    assert results[1][1] is not None
    ranges = _check_prefetches(results, config.max_bytes)
    assert ranges[0] == (2 * READ, 2 * READ + 1 * MiB)
    # The window goes 1, 2, 4, 8, 16 MiB and stays there.
    assert sorted(set(windows)) == [1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB]
    assert windows == sorted(windows)
    assert len(tracker.streams) == 1
    # The prefetched range stays contiguous: each top-up starts where the last one ended.
    for (_, end_a), (start_b, _) in zip(ranges, ranges[1:], strict=False):
        assert start_b == end_a
    # Readahead keeps ahead of the reader all the way.
    assert ranges[-1][1] > results[-1][0]
    # Top-ups come in large steps, not one per read.
    assert len(ranges) < len(results) // 8


def test_window_sequence_is_doubling() -> None:
    config = ReadaheadConfig(initial_bytes=1 * MiB, max_bytes=8 * MiB)
    tracker = StreamTracker(config)
    seen = []
    for i in range(600):
        tracker.on_read(i * READ, READ)
        if tracker.streams[0].window and (not seen or seen[-1] != tracker.streams[0].window):
            seen.append(tracker.streams[0].window)
    assert seen == [1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB]


def test_initial_window_larger_than_max_is_capped() -> None:
    tracker = StreamTracker(ReadaheadConfig(initial_bytes=4 * MiB, max_bytes=1 * MiB))
    results = _sequential(tracker, 0, 100)
    for start, end in _check_prefetches(results, 1 * MiB):
        assert end - start <= 1 * MiB


@given(
    sizes=st.lists(st.integers(1, 3 * MiB), min_size=2, max_size=200),
    initial_kib=st.integers(4, 4096),
    max_kib=st.integers(4, 16384),
)
def test_sequential_reads_of_any_size_keep_invariants(
    sizes: list[int], initial_kib: int, max_kib: int
) -> None:
    config = ReadaheadConfig(initial_bytes=initial_kib * KiB, max_bytes=max_kib * KiB)
    tracker = StreamTracker(config)
    offset = 0
    results = []
    for size in sizes:
        results.append((offset + size, tracker.on_read(offset, size)))
        offset += size
        assert all(s.window <= config.max_bytes for s in tracker.streams)
    assert results[0][1] is None
    assert results[1][1] is not None
    _check_prefetches(results, config.max_bytes)


def test_random_far_apart_reads_never_prefetch() -> None:
    config = ReadaheadConfig()
    tracker = StreamTracker(config)
    rng = random.Random(1234)
    # Offsets on a 4 MiB grid: any two reads are further apart than the slack.
    offsets = [i * 4 * MiB for i in range(500)]
    rng.shuffle(offsets)
    for offset in offsets:
        assert tracker.on_read(offset, rng.choice([4 * KiB, 64 * KiB, READ])) is None
        assert len(tracker.streams) <= config.max_streams


def test_reordered_reads_within_slack_keep_the_window() -> None:
    config = ReadaheadConfig()
    tracker = StreamTracker(config)
    # Kernel readahead delivers 128 KiB reads as pairs swapped: 1, 0, 3, 2, 5, 4, ...
    order = [i ^ 1 for i in range(800)]
    results = [((n + 1) * READ, tracker.on_read(n * READ, READ)) for n in order]
    assert len(tracker.streams) == 1  # never mistaken for a new stream
    assert tracker.streams[0].window == config.max_bytes
    ranges = [a for _, a in results if a is not None]
    for (_, end_a), (start_b, _) in zip(ranges, ranges[1:], strict=False):
        assert start_b >= end_a  # still disjoint and ascending
    assert ranges[-1][1] > 800 * READ  # still ahead of the reader


def test_out_of_order_read_does_not_reset_a_grown_window() -> None:
    config = ReadaheadConfig()
    tracker = StreamTracker(config)
    _sequential(tracker, 0, 200)
    grown = tracker.streams[0].window
    assert grown > config.initial_bytes
    head = tracker.streams[0].next_offset
    # A read from just behind the head (within slack) and one just past it.
    tracker.on_read(head - 3 * READ, READ)
    tracker.on_read(head + READ, READ)
    assert len(tracker.streams) == 1
    assert tracker.streams[0].window >= grown


def test_a_real_seek_starts_over() -> None:
    config = ReadaheadConfig()
    tracker = StreamTracker(config)
    first = _check_prefetches(_sequential(tracker, 0, 200), config.max_bytes)
    assert first
    far = 10_000 * MiB
    assert tracker.on_read(far, READ) is None  # one read after a seek is not a stream yet
    ahead = tracker.on_read(far + READ, READ)
    assert ahead == (far + 2 * READ, far + 2 * READ + config.initial_bytes)  # initial window


def test_two_interleaved_streams_both_get_readahead() -> None:
    config = ReadaheadConfig(max_bytes=8 * MiB)
    tracker = StreamTracker(config)
    base_b = 5000 * MiB
    results_a, results_b = [], []
    for i in range(400):
        results_a.append(((i + 1) * READ, tracker.on_read(i * READ, READ)))
        results_b.append((base_b + (i + 1) * READ, tracker.on_read(base_b + i * READ, READ)))
    ranges_a = _check_prefetches(results_a, config.max_bytes)
    ranges_b = _check_prefetches(results_b, config.max_bytes)
    assert results_a[1][1] is not None and results_b[1][1] is not None
    assert all(end <= base_b for _, end in ranges_a)
    assert all(start >= base_b for start, _ in ranges_b)
    assert len(tracker.streams) == 2
    assert all(s.window == config.max_bytes for s in tracker.streams)


def test_stream_count_is_bounded_and_least_recent_is_dropped() -> None:
    config = ReadaheadConfig(max_streams=3)
    tracker = StreamTracker(config)
    bases = [i * 1000 * MiB for i in range(6)]
    for base in bases:
        tracker.on_read(base, READ)
        assert len(tracker.streams) <= config.max_streams
    assert len(tracker.streams) == 3
    assert sorted(s.next_offset for s in tracker.streams) == [b + READ for b in bases[3:]]
    # The oldest stream was forgotten: continuing it looks like a fresh first read.
    assert tracker.on_read(bases[0] + READ, READ) is None
    # A remembered one continues as a stream.
    assert tracker.on_read(bases[5] + READ, READ) is not None
    assert len(tracker.streams) == 3


def test_streams_in_use_survive_random_reads() -> None:
    config = ReadaheadConfig(max_streams=2)
    tracker = StreamTracker(config)
    rng = random.Random(7)
    got = 0
    for i in range(300):
        if tracker.on_read(i * READ, READ) is not None:
            got += 1
        tracker.on_read(100_000 * MiB + rng.randrange(1000) * 64 * MiB, READ)
    assert got > 1  # the sequential stream kept its readahead despite the noise


def test_sparse_rising_reads_never_prefetch() -> None:
    """Scattered small files of a filesystem, read in disk order: gaps within the slack,
    but most of the span unread. Not a stream."""
    tracker = StreamTracker(ReadaheadConfig())
    for i in range(500):
        assert tracker.on_read(i * 200 * KiB, 16 * KiB) is None


def test_a_stream_that_turns_sparse_stops_reading_ahead() -> None:
    tracker = StreamTracker(ReadaheadConfig())
    assert any(ahead for _, ahead in _sequential(tracker, 0, 8))  # 1 MiB read densely
    offset = 8 * READ
    prefetched = []
    for _ in range(200):  # then 4 KiB every 512 KiB
        offset += 512 * KiB
        prefetched.append(tracker.on_read(offset, 4 * KiB))
    assert all(p is None for p in prefetched[20:])
