"""Where a file's bytes lie on its block device: the FS_IOC_FIEMAP ioctl.

Run as root on paths that may come from a hostile image's metadata, so a file is opened
only once it is known to be a regular file: the last component is opened with O_PATH
and O_NOFOLLOW (which opens no device, FIFO or symlink), checked with fstat, and only
then reopened for reading (O_RDONLY, O_NONBLOCK, O_NOCTTY) through /proc/self/fd. A
PathBelow is resolved one component at a time from its root, following no symlink and
leaving neither the root's directory tree nor its filesystem.
"""

import errno
import fcntl
import os
import stat
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


_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class PathBelow(str):
    """`root`/`rel`, where `rel` was named by something untrusted (an image's metadata):
    file_extents opens it below `root` only. Other string operations give plain str."""

    root: str
    rel: str

    def __new__(cls, root: str, rel: str) -> "PathBelow":
        self = super().__new__(cls, os.path.join(root, rel))
        self.root, self.rel = root, rel
        return self


def safe_rel(rel: str) -> bool:
    """Whether `rel` names something below its directory: a relative path of plain names
    (none empty, ".", ".." or holding a NUL), so that joining it cannot leave."""
    return all(part not in ("", ".", "..") and "\0" not in part for part in rel.split("/"))


def file_extents(path: str) -> list[Extent]:
    """The mapped, plainly stored extents of a regular file, in file order (a symlink,
    directory, device or FIFO raises OSError without being opened)."""
    fd = _open_below(path) if isinstance(path, PathBelow) else _open_regular(path, None, None)
    try:
        return _fiemap(fd)
    finally:
        os.close(fd)


def _open_below(path: PathBelow) -> int:
    if not safe_rel(path.rel):
        raise OSError(errno.EINVAL, "not a path below its root", str(path))
    *dirs, name = path.rel.split("/")
    fd = os.open(path.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        device = os.fstat(fd).st_dev
        for part in dirs:
            below = os.open(part, _PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
            if os.fstat(fd).st_dev != device:
                raise OSError(errno.EXDEV, "leaves its filesystem", str(path))
        return _open_regular(name, fd, device)
    finally:
        os.close(fd)


def _open_regular(path: str, dir_fd: int | None, device: int | None) -> int:
    """`path` opened for reading if it is a regular file (on `device`, if given)."""
    fd = os.open(path, _PATH, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if device is not None and st.st_dev != device:
            raise OSError(errno.EXDEV, "leaves its filesystem", path)
        return os.open(f"/proc/self/fd/{fd}", _READ)
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
