"""What `backupfs find/log/diff/cat` need of a filesystem, read from its image in userspace.

One protocol for every filesystem reader (ext4 in ext4fs.py over ext4meta.py, xfs in
xfsmeta.py): inodes by number, directory entries, where a file's bytes are. Every
position is absolute in the disk image (the reader is made with the partition's start),
so a caller can compare the store's per-block digests of two snapshots for any range a
reader names. Readers are synchronous over a `Read` callable and raise their own
`NotExt4`/`NotXfs`-style errors, all subclasses of `FsError`, for anything unexpected or
hostile: never a wrong answer, never an unbounded loop or allocation.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Read = Callable[[int, int], bytes]  # (offset in the image, length) -> exactly that many bytes
Range = tuple[int, int]  # [start, end) in the image

S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000


class FsError(Exception):
    """Not a filesystem this reader knows, or metadata it refuses (damaged or crafted)."""


class ModeKinds:
    """What an inode is, from its `mode` (shared by every reader's inode type)."""

    mode: int

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    @property
    def is_file(self) -> bool:
        return self.mode & S_IFMT == S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.mode & S_IFMT == S_IFLNK


@dataclass(frozen=True)
class FileInfo(ModeKinds):
    number: int  # inode number
    mode: int  # st_mode: type and permission bits
    size: int
    mtime_ns: int
    uid: int
    gid: int
    nlink: int
    record: Range  # where the inode's own record lies in the image


@dataclass(frozen=True)
class DataRun:
    """`length` bytes of a file from `file_offset` lie at `image_offset` in the image."""

    file_offset: int
    image_offset: int
    length: int


class FsReader(Protocol):
    root: int  # the root directory's inode number

    def inode(self, number: int) -> FileInfo:
        """The inode `number` (its record read through `Read`)."""
        ...

    def entries(self, directory: FileInfo) -> list[tuple[str, int]]:
        """(name, inode number) of each entry of a directory, without `.` and `..`. Names
        are decoded with surrogateescape (bytes as they are on disk)."""
        ...

    def data_runs(self, info: FileInfo) -> list[DataRun]:
        """Where a regular file's (or a long symlink's) bytes are, in file order; holes
        and unwritten extents are left out (they read as zeros). Inline data (bytes kept
        in the inode itself) is a run inside the inode's record."""
        ...

    def metadata_ranges(self, info: FileInfo) -> list[Range]:
        """The image ranges a directory's listing is read from (its blocks, and for a
        B+tree directory its index blocks): what must be compared to know it unchanged."""
        ...
