"""Block arithmetic in backupfs.ranges checked against a plain bytes model."""

from hypothesis import given
from hypothesis import strategies as st

from backupfs.ranges import (
    block_count,
    block_range,
    block_span,
    contiguous_runs,
    overlap,
    slice_blocks,
)

block_sizes = st.sampled_from([1, 2, 3, 7, 16, 512, 4096])


def _blocks_of(data: bytes, block_size: int) -> list[bytes]:
    """The model: a file cut into blocks of `block_size`, the last one possibly short."""
    return [data[i : i + block_size] for i in range(0, len(data), block_size)]


@given(
    data=st.binary(max_size=20_000),
    block_size=block_sizes,
    offset=st.integers(0, 22_000),
    size=st.integers(0, 22_000),
)
def test_range_span_and_slice_reproduce_the_bytes(
    data: bytes, block_size: int, offset: int, size: int
) -> None:
    file_size = len(data)
    needed = block_range(offset, size, block_size, file_size)
    expected = data[offset : offset + size]
    if not expected:
        assert len(needed) == 0
        return
    blocks = []
    for n in needed:
        start, end = block_span(n, block_size, file_size)
        assert start == n * block_size
        assert 0 <= start < end <= file_size
        assert end - start == block_size or end == file_size
        blocks.append(data[start:end])
    # Every block returned holds at least one requested byte: no block too many.
    assert needed[0] * block_size <= offset < (needed[0] + 1) * block_size
    last_byte = min(offset + size, file_size) - 1
    assert needed[-1] == last_byte // block_size
    assert slice_blocks(blocks, needed[0], block_size, offset, size) == expected


@given(data=st.binary(max_size=5000), block_size=block_sizes)
def test_whole_file_blocks(data: bytes, block_size: int) -> None:
    file_size = len(data)
    needed = block_range(0, file_size + 10, block_size, file_size)
    assert len(needed) == block_count(block_size, file_size) == len(_blocks_of(data, block_size))
    spans = [block_span(n, block_size, file_size) for n in needed]
    assert b"".join(data[s:e] for s, e in spans) == data


def test_block_range_examples() -> None:
    assert block_range(0, 1, 4096, 10_000) == range(0, 1)
    assert block_range(4095, 2, 4096, 10_000) == range(0, 2)
    assert block_range(4096, 4096, 4096, 10_000) == range(1, 2)
    assert block_range(8000, 100_000, 4096, 10_000) == range(1, 3)
    assert block_range(10_000, 5, 4096, 10_000) == range(0)  # at EOF
    assert block_range(20_000, 5, 4096, 10_000) == range(0)  # past EOF
    assert block_range(100, 0, 4096, 10_000) == range(0)  # empty read
    assert block_span(2, 4096, 10_000) == (8192, 10_000)  # short last block
    assert block_count(4096, 0) == 0
    assert block_count(4096, 8193) == 3


def test_slice_blocks_single_block_is_not_joined() -> None:
    assert slice_blocks([b"abcdef"], 3, 6, 20, 3) == b"cde"
    assert slice_blocks([b"abc", b"def"], 0, 3, 2, 100) == b"cdef"


@given(
    block_nos=st.sets(st.integers(0, 300), max_size=120).map(sorted),
    max_blocks=st.integers(1, 10),
)
def test_contiguous_runs_cover_the_input(block_nos: list[int], max_blocks: int) -> None:
    runs = list(contiguous_runs(block_nos, max_blocks))
    covered = [n for first, end in runs for n in range(first, end)]
    assert covered == block_nos  # exactly the input, in order, nothing twice
    for first, end in runs:
        assert 1 <= end - first <= max_blocks
    # Adjacent runs that touch are split only because the first one was full.
    for (first_a, end_a), (first_b, _) in zip(runs, runs[1:], strict=False):
        assert first_b >= end_a
        if first_b == end_a:
            assert end_a - first_a == max_blocks


def test_contiguous_runs_examples() -> None:
    assert list(contiguous_runs([], 4)) == []
    assert list(contiguous_runs(range(10), 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(contiguous_runs([1, 2, 3, 7, 8, 20], 8)) == [(1, 4), (7, 9), (20, 21)]
    assert list(contiguous_runs([5], 1)) == [(5, 6)]
    assert list(contiguous_runs(range(3), 1)) == [(0, 1), (1, 2), (2, 3)]


@given(
    start=st.integers(0, 200),
    length=st.integers(0, 100),
    lo=st.integers(0, 200),
    width=st.integers(0, 100),
)
def test_overlap_counts_the_common_bytes(start: int, length: int, lo: int, width: int) -> None:
    common = set(range(start, start + length)) & set(range(lo, lo + width))
    assert overlap(start, start + length, lo, lo + width) == len(common)
    assert overlap(lo, lo + width, start, start + length) == len(common)


def test_overlap_examples() -> None:
    assert overlap(500, 2500, 0, 1000) == 500
    assert overlap(500, 2500, 1000, 2000) == 1000
    assert overlap(0, 10, 10, 20) == 0  # touching half-open ranges share nothing
    assert overlap(0, 10, 30, 40) == 0


def test_covered_merges_and_answers_whole_ranges_only() -> None:
    import random

    from backupfs.ranges import Covered

    covered = Covered()
    covered.add(10, 20)
    covered.add(30, 40)
    assert covered.covers(12, 20) and not covered.covers(15, 25) and not covered.covers(0, 5)
    covered.add(20, 30)  # touching both: one range
    assert len(covered) == 1 and covered.covers(10, 40) and not covered.covers(9, 40)
    rng, model, other = random.Random(5), set(), Covered()
    for _ in range(300):
        lo = rng.randrange(0, 1000)
        hi = lo + rng.randrange(0, 60)
        other.add(lo, hi)
        model.update(range(lo, hi))
        a = rng.randrange(0, 1000)
        b = a + rng.randrange(1, 40)
        assert other.covers(a, b) == all(x in model for x in range(a, b))
