"""Where a file's bytes lie on its block device (FIEMAP), and merging those into few ranges.

A filesystem attached from an image sits on a loop device that starts at the partition's
offset in the image, so `partition start + physical offset` is the byte in the image.
"""

import errno
import fcntl
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ2QI3I")  # logical, physical, length, reserved64[2], flags, ...
_BATCH = 256
_LAST = 0x1
# Extents whose bytes are not plainly at `physical` on the device: location unknown or
# delayed, encoded (compressed/encrypted), packed with other data, or not yet written.
_NOT_PLAIN = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
# Filesystems whose FIEMAP offsets are device offsets (btrfs reports its own logical
# address space, so it is left to plain readahead).
PLANNABLE_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "vfat"})

Range = tuple[int, int]  # [start, end) in bytes


@dataclass(frozen=True)
class Extent:
    logical: int  # offset in the file
    physical: int  # offset on the block device
    length: int


class NoFiemap(Exception):
    """The filesystem does not report extents."""


def file_extents(path: str) -> list[Extent]:
    """The mapped, plainly stored extents of a file, in file order."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return _fiemap(fd)
    finally:
        os.close(fd)


def _fiemap(fd: int) -> list[Extent]:
    extents: list[Extent] = []
    start = 0
    while True:
        buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise NoFiemap(os.strerror(exc.errno)) from None
            raise
        mapped = _HEADER.unpack_from(buf, 0)[3]
        last = False
        for i in range(mapped):
            logical, physical, length, _, _, flags, *_ = _EXTENT.unpack_from(
                buf, _HEADER.size + i * _EXTENT.size
            )
            if not flags & _NOT_PLAIN:
                extents.append(Extent(logical, physical, length))
            start = logical + length
            last = last or bool(flags & _LAST)
        if last or mapped == 0:
            return extents


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
