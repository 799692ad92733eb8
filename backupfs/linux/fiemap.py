"""Where a file's bytes lie on its block device: the FS_IOC_FIEMAP ioctl."""

import errno
import fcntl
import os
import struct
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
