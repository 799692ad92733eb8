"""ext2/3/4 on-disk metadata, read from the disk image itself: where an inode lies, what
a directory holds and which blocks hold a directory, a long symlink or an xattr block.

Enough to find the metadata a tree walk will need before the kernel asks for it, one
dependent read at a time (metaprefetch.py). Layout: the kernel's
Documentation/filesystems/ext4/ (superblock, group descriptors, inodes, extent tree,
directory entries). Anything unexpected raises NotExt4 and the caller does without.
"""

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from backupfs.plan.extents import Extent

Read = Callable[[int, int], bytes]  # (offset in the image, length) -> bytes
Range = tuple[int, int]  # [start, end) in the image

_MAGIC = 0xEF53
_INCOMPAT_FILETYPE = 0x2
_INCOMPAT_META_BG = 0x10
_INCOMPAT_64BIT = 0x80
_EXTENTS_FL = 0x80000
_INLINE_DATA_FL = 0x10000000
_EXTENT_MAGIC = 0xF30A
_UNWRITTEN = 32768  # an ee_len above this marks an unwritten (reads-as-zero) extent
S_IFMT, S_IFDIR, S_IFLNK, S_IFREG = 0o170000, 0o040000, 0o120000, 0o100000
ROOT_INODE = 2
MAX_GDT_BYTES = 64 << 20  # 1M groups of 64 bytes: a 128 TiB filesystem at 4 KiB blocks


class NotExt4(Exception):
    """Not an ext2/3/4 filesystem this module can read (or a corrupt one)."""


@dataclass(frozen=True)
class Inode:
    number: int
    mode: int
    flags: int
    size: int
    block: bytes  # i_block: extent tree root, block map or inline data (60 bytes)
    xattr_block: int  # i_file_acl: the external xattr block, 0 if none

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    @property
    def is_file(self) -> bool:
        return self.mode & S_IFMT == S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.mode & S_IFMT == S_IFLNK

    @property
    def inline(self) -> bool:
        """Data held in the inode itself (inline data, or a symlink under 60 bytes)."""
        if self.flags & _INLINE_DATA_FL:
            return True
        return self.is_symlink and self.size < 60 and not self.flags & _EXTENTS_FL


@dataclass(frozen=True)
class Entry:
    name: bytes
    inode: int
    is_dir: bool | None  # from the entry's file type; None without the filetype feature


class Ext4:
    """One ext2/3/4 filesystem starting at byte `start` of an image read with `read`."""

    def __init__(self, read: Read, start: int) -> None:
        self.read, self.start = read, start
        sb = read(start + 1024, 1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != _MAGIC:
            raise NotExt4("no ext2/3/4 superblock")
        log_bs, self.inodes_per_group = struct.unpack_from("<I", sb, 24)[0], _u32(sb, 40)
        self.first_data_block, rev = _u32(sb, 20), _u32(sb, 76)
        self.block_size = 1024 << log_bs
        self.inode_size = struct.unpack_from("<H", sb, 88)[0] if rev else 128
        incompat = _u32(sb, 96)
        if incompat & _INCOMPAT_META_BG or log_bs > 6 or not self.inodes_per_group:
            raise NotExt4("unsupported ext4 layout (meta_bg or odd sizes)")
        self.filetype = bool(incompat & _INCOMPAT_FILETYPE)
        wide = incompat & _INCOMPAT_64BIT
        desc_size = struct.unpack_from("<H", sb, 254)[0] if wide else 32
        groups = -(-_u32(sb, 0) // self.inodes_per_group)
        if groups * desc_size > MAX_GDT_BYTES:
            raise NotExt4("group descriptor table too large")
        gdt = read(self._at(self.first_data_block + 1), groups * desc_size)
        if len(gdt) < groups * desc_size:
            raise NotExt4("short group descriptor table")
        self.tables: list[int] = []  # block of each group's inode table
        for g in range(groups):
            table = _u32(gdt, g * desc_size + 8)
            if desc_size >= 64:
                table |= _u32(gdt, g * desc_size + 0x28) << 32
            self.tables.append(table)

    def _at(self, block: int) -> int:
        return self.start + block * self.block_size

    def inode_range(self, number: int) -> Range:
        group, index = divmod(number - 1, self.inodes_per_group)
        if not 0 <= group < len(self.tables):
            raise NotExt4(f"inode {number} out of range")
        at = self._at(self.tables[group]) + index * self.inode_size
        return at, at + self.inode_size

    def parse_inode(self, number: int, raw: bytes) -> Inode:
        if len(raw) < 128:
            raise NotExt4(f"short inode {number}")
        size = _u32(raw, 4) | _u32(raw, 108) << 32
        xattr = _u32(raw, 104) | _u16(raw, 118) << 32
        return Inode(number, _u16(raw, 0), _u32(raw, 32), size, bytes(raw[40:100]), xattr)

    def data_ranges(self, inode: Inode) -> list[Range]:
        """Image byte ranges holding the inode's data (written extents only); reads
        extent index and indirect blocks on the way, which are rare for metadata."""
        if inode.inline or inode.size == 0:
            return []
        nblocks = -(-inode.size // self.block_size)
        if inode.flags & _EXTENTS_FL:
            runs = list(self._extents(inode.block, 0))
        else:
            runs = [(b, 1) for b in self._block_map(inode.block, nblocks)]
        out: list[Range] = []
        for block, count in runs:
            if block:
                out.append((self._at(block), self._at(block + count)))
        return out

    def inode_extents(self, inode: Inode) -> list[Extent] | None:
        """A file's written extents (physical offsets from the filesystem's start) when
        its whole extent tree lies in the inode, so no read is needed; else None."""
        if inode.flags & _INLINE_DATA_FL or not inode.flags & _EXTENTS_FL:
            return None
        magic, entries, _, depth = struct.unpack_from("<4H", inode.block, 0)
        if magic != _EXTENT_MAGIC or depth or entries > 4:
            return None
        bs, out = self.block_size, []
        for i in range(entries):
            logical, length, hi, lo = struct.unpack_from("<IHHI", inode.block, 12 + 12 * i)
            if length <= _UNWRITTEN:
                out.append(Extent(logical * bs, (hi << 32 | lo) * bs, length * bs))
        return out

    def _extents(self, node: bytes, depth_seen: int) -> Iterator[tuple[int, int]]:
        magic, entries, _, depth = struct.unpack_from("<4H", node, 0)
        if magic != _EXTENT_MAGIC or depth_seen > 5 or 12 + 12 * entries > len(node):
            raise NotExt4("bad extent tree")
        for i in range(entries):
            e = 12 + 12 * i
            if depth == 0:
                length, hi, lo = _u16(node, e + 4), _u16(node, e + 6), _u32(node, e + 8)
                if length <= _UNWRITTEN:
                    yield hi << 32 | lo, length
            else:
                leaf = _u32(node, e + 4) | _u16(node, e + 8) << 32
                child = self.read(self._at(leaf), self.block_size)
                yield from self._extents(child, depth_seen + 1)

    def _block_map(self, iblock: bytes, nblocks: int) -> list[int]:
        """Block numbers of an ext2/3 style block map, in file order, up to `nblocks`."""
        ptrs = self.block_size // 4
        blocks = list(struct.unpack_from("<12I", iblock, 0))[:nblocks]
        for level, at in enumerate((48, 52, 56), start=1):
            if len(blocks) >= nblocks:
                break
            blocks += self._indirect(_u32(iblock, at), level, ptrs)[: nblocks - len(blocks)]
        return blocks

    def _indirect(self, block: int, level: int, ptrs: int) -> list[int]:
        if not block:
            return []
        raw = self.read(self._at(block), self.block_size)
        children = list(struct.unpack_from(f"<{ptrs}I", raw, 0))
        if level == 1:
            return children
        return [b for c in children if c for b in self._indirect(c, level - 1, ptrs)]

    def entries(self, inode: Inode, data: bytes) -> Iterator[Entry]:
        """A directory's entries (not . and ..), from its data blocks or inline data."""
        if inode.flags & _INLINE_DATA_FL:
            yield from self._dirents(inode.block[4:], len(inode.block) - 4)
            return
        for at in range(0, len(data) - self.block_size + 1, self.block_size):
            yield from self._dirents(data[at : at + self.block_size], self.block_size)

    def _dirents(self, block: bytes, size: int) -> Iterator[Entry]:
        at = 0
        while at + 8 <= size:
            number, rec_len, name_len, ftype = struct.unpack_from("<IHBB", block, at)
            if rec_len < 8 or at + rec_len > size:
                return  # corrupt or the end: the kernel will say what it thinks
            if not self.filetype:
                name_len, ftype = name_len | ftype << 8, 0
            name = bytes(block[at + 8 : at + 8 + name_len])
            if number and name not in (b".", b"..") and name_len <= rec_len - 8:
                yield Entry(name, number, (ftype == 2) if self.filetype else None)
            at += rec_len


def _u16(buf: bytes, at: int) -> int:
    return int(struct.unpack_from("<H", buf, at)[0])


def _u32(buf: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", buf, at)[0])
