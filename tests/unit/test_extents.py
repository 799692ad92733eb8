"""FIEMAP extents on a real file, and the pure range arithmetic of read plans."""

import os
from pathlib import Path

from backupfs.linux.fiemap import Extent, file_extents
from backupfs.plan.extents import merge, to_image


def test_merge_joins_small_gaps_in_reading_order() -> None:
    ranges = [(0, 10), (12, 20), (100, 110), (5, 8), (8, 9)]
    assert list(merge(ranges, 4)) == [(0, 20), (100, 110), (5, 9)]
    assert list(merge(ranges, 0)) == [(0, 10), (12, 20), (100, 110), (5, 9)]
    assert list(merge([], 4)) == []


def test_merge_never_joins_backwards() -> None:
    assert list(merge([(100, 200), (50, 60)], 1 << 20)) == [(100, 200), (50, 60)]


def test_to_image_adds_the_partition_start_and_trims_the_tail() -> None:
    extents = [Extent(0, 4096, 8192), Extent(8192, 40960, 4096)]
    assert to_image(extents, 1 << 20, 10000) == [
        ((1 << 20) + 4096, (1 << 20) + 4096 + 8192),
        ((1 << 20) + 40960, (1 << 20) + 40960 + 10000 - 8192),
    ]
    assert to_image(extents, 0, 8192) == [(4096, 4096 + 8192)]


def test_file_extents_cover_a_written_file(tmp_path: Path) -> None:
    """Where the bytes really are is checked against a disk image in test_readplan.py."""
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 << 20))
    extents = file_extents(str(path))  # FIEMAP_FLAG_SYNC: written out, no delalloc extents
    assert extents and extents[0].logical == 0
    assert sum(e.length for e in extents) >= 3 << 20
    assert all(e.physical > 0 for e in extents)


def test_merge_streams_ranges_as_they_come() -> None:
    """A restore's plan is sent while its files are still being mapped."""

    def mapped_so_far():  # type: ignore[no-untyped-def]
        yield (0, 10)
        yield (100, 110)
        raise AssertionError("merge read further than it needed")

    assert next(merge(mapped_so_far(), 4)) == (0, 10)
