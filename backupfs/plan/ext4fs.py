"""ext2/3/4 as a `fsmeta.FsReader`: inodes with their times and owners, directory entries,
and where a file's bytes are, on top of ext4meta.py (which checks every value it reads)."""

import os
import struct
from collections.abc import Iterable

from backupfs.plan import ext4meta
from backupfs.plan.fsmeta import DataRun, FileInfo, FsError, Range, Read

MAX_FILE_BLOCKS = 1 << 32  # ext4's largest file at 4 KiB blocks is 16 TiB


class Ext4Error(FsError):
    """Not an ext2/3/4 filesystem, or metadata refused (ext4meta.NotExt4/Damaged)."""


def _signed32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


class Ext4Fs:
    root = ext4meta.ROOT_INODE

    def __init__(self, read: Read, start: int, size_bytes: int | None = None) -> None:
        self.read = read
        try:
            self.fs = ext4meta.Ext4(read, start, size_bytes)
        except ext4meta.NotExt4 as exc:
            raise Ext4Error(str(exc)) from None
        self._inodes: dict[int, tuple[FileInfo, ext4meta.Inode]] = {}

    def _load(self, number: int) -> tuple[FileInfo, ext4meta.Inode]:
        found = self._inodes.get(number)
        if found is not None:
            return found
        try:
            start, end = self.fs.inode_range(number)
            raw = self.read(start, end - start)
            parsed = self.fs.parse_inode(number, raw)
        except ext4meta.NotExt4 as exc:
            raise Ext4Error(str(exc)) from None
        mode, uid_lo, _, _, _, mtime = struct.unpack_from("<HHIIII", raw, 0)
        gid_lo, nlink = struct.unpack_from("<HH", raw, 24)
        uid_hi, gid_hi = struct.unpack_from("<HH", raw, 120)
        seconds, nanos = _signed32(mtime), 0
        extra = struct.unpack_from("<H", raw, 128)[0] if len(raw) > 130 else 0
        if extra >= 12 and len(raw) >= 140:
            mtime_extra = struct.unpack_from("<I", raw, 136)[0]
            seconds += (mtime_extra & 3) << 32
            nanos = mtime_extra >> 2
        info = FileInfo(number, mode, parsed.size, seconds * 10**9 + nanos,
                        uid_lo | uid_hi << 16, gid_lo | gid_hi << 16, nlink,
                        (start, end))  # fmt: skip
        if len(self._inodes) > 65536:
            self._inodes.clear()
        self._inodes[number] = (info, parsed)
        return info, parsed

    def inode(self, number: int) -> FileInfo:
        return self._load(number)[0]

    def metadata_ranges(self, info: FileInfo) -> list[Range]:
        inode = self._load(info.number)[1]
        try:
            return [info.record, *self.fs.data_ranges(inode)]
        except ext4meta.NotExt4 as exc:
            raise Ext4Error(str(exc)) from None

    def entries(self, directory: FileInfo) -> list[tuple[str, int]]:
        inode = self._load(directory.number)[1]
        try:
            data = b"".join(self.read(s, e - s) for s, e in self.fs.data_ranges(inode))
            found = [(os.fsdecode(e.name), e.inode) for e in self.fs.entries(inode, data)]
        except ext4meta.NotExt4 as exc:
            raise Ext4Error(str(exc)) from None
        return [(name, n) for name, n in found if name not in (".", "..") and n]

    def data_runs(self, info: FileInfo) -> list[DataRun]:
        inode = self._load(info.number)[1]
        fs, bs = self.fs, self.fs.block_size
        if info.size == 0:
            return []
        if inode.inline:  # the bytes are in i_block (60), the rest in an xattr: not read
            if info.size > 60:
                raise Ext4Error(f"inode {info.number}: inline data over 60 bytes")
            return [DataRun(0, info.record[0] + 40, info.size)]
        if info.is_symlink and info.size < 60 and not inode.flags & 0x80000:
            return [DataRun(0, info.record[0] + 40, info.size)]  # a fast symlink
        nblocks = -(-info.size // bs)
        if nblocks > MAX_FILE_BLOCKS:
            raise Ext4Error(f"inode {info.number}: {info.size} bytes")
        pairs: Iterable[tuple[int, tuple[int, int]]]
        try:
            if inode.flags & 0x80000:  # extents
                tree = ext4meta._Tree(fs, info.number, nblocks)
                runs = tree.runs(inode.block)
                pairs = zip(tree.logical, runs, strict=True)
            else:
                blocks = fs._block_map(inode, nblocks)
                pairs = ((i, (b, 1)) for i, b in enumerate(blocks) if b)
            out = []
            for logical, (physical, count) in pairs:
                length = min(count * bs, info.size - logical * bs)
                out.append(DataRun(logical * bs, fs._at(physical), length))
            return out
        except ext4meta.NotExt4 as exc:
            raise Ext4Error(str(exc)) from None
