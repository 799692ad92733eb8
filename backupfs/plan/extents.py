"""A file's extents (linux.fiemap, or read from ext4 inodes) as image ranges, merged into few.

A filesystem attached from an image sits on a loop device that starts at the partition's
offset in the image, so `partition start + physical offset` is the byte in the image.
"""

from collections.abc import Iterable, Iterator

from backupfs.linux.fiemap import Extent

# Filesystems whose FIEMAP offsets are device offsets (btrfs reports its own logical
# address space, so it is left to plain readahead).
PLANNABLE_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "vfat"})

Range = tuple[int, int]  # [start, end) in bytes


def to_image(extents: Iterable[Extent], partition_start: int, size_bytes: int) -> list[Range]:
    """Device extents as image ranges; only the file's `size_bytes` count (the last extent
    is rounded up to a whole filesystem block)."""
    out = []
    for e in extents:
        length = min(e.length, size_bytes - e.logical)
        if length > 0:
            out.append((partition_start + e.physical, partition_start + e.physical + length))
    return out


def merge(ranges: Iterable[Range], max_gap: int, max_len: int = 1 << 62) -> Iterator[Range]:
    """Join each range to the previous one when it starts at most `max_gap` bytes after it
    and the two span at most `max_len` bytes (order is kept: it is the order of reading).
    Lazy: a plan streams while it is made."""
    held: Range | None = None
    for start, end in ranges:
        if held is not None and 0 <= start - held[1] <= max_gap and end - held[0] <= max_len:
            held = (held[0], max(held[1], end))
            continue
        if held is not None:
            yield held
        held = (start, end)
    if held is not None:
        yield held
