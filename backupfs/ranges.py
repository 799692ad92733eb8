"""Block arithmetic on half-open byte ranges `[start, end)`. Pure functions, no I/O."""

import bisect
from collections.abc import Iterable, Iterator


def block_range(offset: int, size: int, block_size: int, file_size: int) -> range:
    """Block numbers that hold bytes `[offset, offset + size)` clipped to the file."""
    end = min(offset + size, file_size)
    if offset >= end:
        return range(0)
    return range(offset // block_size, (end - 1) // block_size + 1)


def block_span(block_no: int, block_size: int, file_size: int) -> tuple[int, int]:
    """Byte range `[start, end)` of one block; the last block may be short."""
    start = block_no * block_size
    return start, min(start + block_size, file_size)


def overlap(start: int, end: int, lo: int, hi: int) -> int:
    """How many bytes `[start, end)` and `[lo, hi)` have in common (0 if disjoint)."""
    return max(0, min(end, hi) - max(start, lo))


def block_count(block_size: int, file_size: int) -> int:
    return -(-file_size // block_size)


def contiguous_runs(block_nos: Iterable[int], max_blocks: int) -> Iterator[tuple[int, int]]:
    """Group ascending block numbers into runs `[first, end)` of at most `max_blocks`."""
    first = end = -1
    for block_no in block_nos:
        if block_no == end and end - first < max_blocks:
            end += 1
            continue
        if first >= 0:
            yield first, end
        first, end = block_no, block_no + 1
    if first >= 0:
        yield first, end


def slice_blocks(
    blocks: list[bytes], first_block: int, block_size: int, offset: int, size: int
) -> bytes:
    """Bytes `[offset, offset + size)` out of consecutive blocks starting at `first_block`."""
    joined = blocks[0] if len(blocks) == 1 else b"".join(blocks)
    start = offset - first_block * block_size
    return joined[start : start + size]


class Covered:
    """A set of byte ranges, merged: what has been added, and whether a range is all in."""

    def __init__(self) -> None:
        self._starts: list[int] = []  # sorted, disjoint, not touching
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        lo = bisect.bisect_left(self._ends, start)  # the first range ending at or after
        hi = bisect.bisect_right(self._starts, end)  # past the last starting at or before
        if lo < hi:
            start, end = min(start, self._starts[lo]), max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def covers(self, start: int, end: int) -> bool:
        """Whether every byte of `[start, end)` was added (an empty range: yes)."""
        if start >= end:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def __len__(self) -> int:
        return len(self._starts)
