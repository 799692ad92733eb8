"""ext2/3/4 on-disk metadata, read from the disk image itself: where an inode lies, what
a directory holds and which blocks hold a directory, a long symlink or an xattr block.

Enough to find the metadata a tree walk will need before the kernel asks for it, one
dependent read at a time (metaprefetch.py). Layout: the kernel's
Documentation/filesystems/ext4/ (superblock, group descriptors, inodes, extent tree,
directory entries). Anything unexpected raises NotExt4 and the caller does without.

The image is hostile input: every count, size and block number in it is checked before
it is used, against the limits the kernel itself enforces (fs/ext4/super.c,
extents.c) and against the device the filesystem sits on, so that no crafted value
makes this reader loop, recurse without end, read past its filesystem or allocate
much more than the structures it reads. Such values raise Damaged.
"""

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from backupfs.plan.extents import Extent
from backupfs.plan.fsmeta import ModeKinds

Read = Callable[[int, int], bytes]  # (offset in the image, length) -> bytes
Range = tuple[int, int]  # [start, end) in the image

_MAGIC = 0xEF53
_INCOMPAT_FILETYPE = 0x2
_INCOMPAT_META_BG = 0x10
_INCOMPAT_64BIT = 0x80
_RO_COMPAT_BIGALLOC = 0x200
_EXTENTS_FL = 0x80000
_INLINE_DATA_FL = 0x10000000
_EXTENT_MAGIC = 0xF30A
_UNWRITTEN = 32768  # an ee_len above this marks an unwritten (reads-as-zero) extent
_MAX_DEPTH = 5  # of an extent tree (the kernel's EXT4_MAX_EXTENT_DEPTH)
S_IFMT, S_IFDIR, S_IFLNK, S_IFREG = 0o170000, 0o040000, 0o120000, 0o100000
ROOT_INODE = 2
# The group descriptor table is read whole: 8 MiB is 131072 groups of 64 bytes, a 16 TiB
# filesystem at 4 KiB blocks. Larger ones are left to the kernel.
MAX_GDT_BYTES = 8 << 20
# The most data of one inode (a directory, a long symlink) this reader maps for reading:
# about a million entries. A larger directory is left to the kernel.
MAX_DATA_BYTES = 64 << 20


class NotExt4(Exception):
    """Not an ext2/3/4 filesystem this module can read (or a corrupt one)."""


class Damaged(NotExt4):
    """Metadata no mke2fs or kernel writes (corrupt or crafted), refused before use."""


@dataclass(frozen=True)
class Inode(ModeKinds):
    number: int
    mode: int
    flags: int
    size: int
    block: bytes  # i_block: extent tree root, block map or inline data (60 bytes)
    xattr_block: int  # i_file_acl: the external xattr block, 0 if none

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
    """One ext2/3/4 filesystem starting at byte `start` of an image read with `read`;
    `size_bytes`, when known, is how much of the image from `start` it may occupy."""

    def __init__(self, read: Read, start: int, size_bytes: int | None = None) -> None:
        self.read, self.start = read, start
        sb = read(start + 1024, 1024)
        if len(sb) < 1024 or _u16(sb, 56) != _MAGIC:
            raise NotExt4("no ext2/3/4 superblock")
        log_bs, log_cluster = _u32(sb, 24), _u32(sb, 28)
        incompat, ro_compat = _u32(sb, 96), _u32(sb, 100)
        if incompat & _INCOMPAT_META_BG or log_bs > 6:
            raise NotExt4("unsupported ext4 layout (meta_bg or odd sizes)")
        bs = self.block_size = 1024 << log_bs
        self.filetype = bool(incompat & _INCOMPAT_FILETYPE)
        wide = incompat & _INCOMPAT_64BIT
        self.inodes_count, self.first_data_block = _u32(sb, 0), _u32(sb, 20)
        self.blocks_count = _u32(sb, 4) | (_u32(sb, 0x150) << 32 if wide else 0)
        per_group, self.inodes_per_group = _u32(sb, 32), _u32(sb, 40)
        self.inode_size = _u16(sb, 88) if _u32(sb, 76) else 128
        desc_size = _u16(sb, 254) if wide else 32
        shift = log_cluster - log_bs if ro_compat & _RO_COMPAT_BIGALLOC else 0
        if not 0 <= shift <= 16 or not 0 < per_group <= 8 * bs << shift:
            raise Damaged(f"{per_group} blocks per group")
        if self.inode_size & (self.inode_size - 1) or not 128 <= self.inode_size <= bs:
            raise Damaged(f"inode size {self.inode_size}")
        if not bs // self.inode_size <= self.inodes_per_group <= 8 * bs:
            raise Damaged(f"{self.inodes_per_group} inodes per group")
        if wide and (desc_size & (desc_size - 1) or not 64 <= desc_size <= 1024):
            raise Damaged(f"group descriptor size {desc_size}")
        if self.first_data_block > 1 or self.blocks_count <= self.first_data_block:
            raise Damaged(f"{self.blocks_count} blocks from block {self.first_data_block}")
        if size_bytes is not None and self.blocks_count * bs > size_bytes:
            raise Damaged(f"{self.blocks_count} blocks of {bs} bytes: more than the device")
        groups = -(-(self.blocks_count - self.first_data_block) // per_group)
        if groups * self.inodes_per_group != self.inodes_count:
            raise Damaged(f"{self.inodes_count} inodes in {groups} groups")
        if groups * desc_size > MAX_GDT_BYTES:
            raise NotExt4(f"{groups} block groups: more than this reader reads")
        self.groups, self.desc_size = groups, desc_size
        self.blocks_per_group, self.cluster_shift = per_group, shift
        self.table_blocks = -(-self.inodes_per_group * self.inode_size // bs)
        # Where the kernel looks for it: the block after the superblock's.
        self.gdt = self._read_blocks(1024 // bs + 1, groups * desc_size)

    def _at(self, block: int) -> int:
        return self.start + block * self.block_size

    def _check_blocks(self, block: int, count: int, what: str) -> None:
        if not (self.first_data_block < block and block + count <= self.blocks_count):
            raise Damaged(f"{what} at block {block} (+{count}) outside the filesystem")

    def _read_blocks(self, block: int, length: int) -> bytes:
        """`length` bytes from `block`, all inside the filesystem, or Damaged."""
        self._check_blocks(block, -(-length // self.block_size), "metadata")
        data = self.read(self._at(block), length)
        if len(data) != length:
            raise Damaged(f"short read at block {block}")
        return data

    def inode_range(self, number: int) -> Range:
        group, index = divmod(number - 1, self.inodes_per_group)
        if not 0 < number <= self.inodes_count:
            raise NotExt4(f"inode {number} out of range")
        at = group * self.desc_size
        table = _u32(self.gdt, at + 8)
        if self.desc_size >= 64:
            table |= _u32(self.gdt, at + 0x28) << 32
        self._check_blocks(table, self.table_blocks, f"the inode table of group {group}")
        offset = self._at(table) + index * self.inode_size
        return offset, offset + self.inode_size

    def parse_inode(self, number: int, raw: bytes) -> Inode:
        if len(raw) < 128:
            raise NotExt4(f"short inode {number}")
        size = _u32(raw, 4) | _u32(raw, 108) << 32
        xattr = _u32(raw, 104) | _u16(raw, 118) << 32
        if xattr:
            self._check_blocks(xattr, 1, f"the xattr block of inode {number}")
        return Inode(number, _u16(raw, 0), _u32(raw, 32), size, bytes(raw[40:100]), xattr)

    def data_ranges(self, inode: Inode) -> list[Range]:
        """Image byte ranges holding the inode's data (written extents only); reads
        extent index and indirect blocks on the way, which are rare for metadata.
        At most MAX_DATA_BYTES, and nothing mapped beyond the inode's size."""
        if inode.inline or inode.size == 0:
            return []
        if inode.size > min(MAX_DATA_BYTES, self.blocks_count * self.block_size):
            raise NotExt4(f"inode {inode.number}: {inode.size} bytes, too many to read ahead")
        nblocks = -(-inode.size // self.block_size)
        if inode.flags & _EXTENTS_FL:
            runs = _Tree(self, inode.number, nblocks).runs(inode.block)
        else:
            runs = [(b, 1) for b in self._block_map(inode, nblocks) if b]
        return [(self._at(block), self._at(block + count)) for block, count in runs]

    def inode_extents(self, inode: Inode) -> list[Extent] | None:
        """A file's written extents (physical offsets from the filesystem's start) when
        its whole extent tree lies in the inode, so no read is needed; else None (also
        when the tree is damaged: FIEMAP asks the kernel, which knows better)."""
        if inode.flags & _INLINE_DATA_FL or not inode.flags & _EXTENTS_FL:
            return None
        magic, entries, most, depth = struct.unpack_from("<4H", inode.block, 0)
        if magic != _EXTENT_MAGIC or depth or entries > most or most > 4:
            return None
        bs, out, end = self.block_size, [], 0
        for i in range(entries):
            logical, length, hi, lo = struct.unpack_from("<IHHI", inode.block, 12 + 12 * i)
            physical = hi << 32 | lo
            count = length - _UNWRITTEN if length > _UNWRITTEN else length
            if logical < end or not count:
                return None
            end = logical + count
            if length <= _UNWRITTEN:
                if not (self.first_data_block < physical and physical + count <= self.blocks_count):
                    return None
                out.append(Extent(logical * bs, physical * bs, count * bs))
        return out

    def _block_map(self, inode: Inode, nblocks: int) -> list[int]:
        """Block numbers of an ext2/3 style block map, in file order, up to `nblocks`;
        0 for a hole. Each indirect block is read once, and only while blocks are due."""
        ptrs, seen = self.block_size // 4, set[int]()
        blocks = list(struct.unpack_from("<12I", inode.block, 0))[:nblocks]
        for level, at in enumerate((48, 52, 56), start=1):
            due = nblocks - len(blocks)
            if due <= 0:
                break
            found = self._indirect(_u32(inode.block, at), level, ptrs, due, seen)
            blocks += found + [0] * (min(due, ptrs**level) - len(found))
        for b in blocks:
            if b:
                self._check_blocks(b, 1, f"a data block of inode {inode.number}")
        return blocks

    def _indirect(self, block: int, level: int, ptrs: int, due: int, seen: set[int]) -> list[int]:
        """Up to `due` block numbers below the indirect block `block` of `level`."""
        if not block:
            return []
        if block in seen:
            raise Damaged(f"indirect block {block} used twice")
        seen.add(block)
        raw = self._read_blocks(block, self.block_size)
        children = list(struct.unpack_from(f"<{ptrs}I", raw, 0))
        if level == 1:
            return children[:due]
        out: list[int] = []
        span = ptrs ** (level - 1)  # blocks below each child
        for child in children:
            if len(out) >= due:
                break
            want = min(span, due - len(out))
            found = self._indirect(child, level - 1, ptrs, want, seen)
            out += found + [0] * (want - len(found))
        return out

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
            if rec_len < 12 or rec_len % 4 or at + rec_len > size:
                return  # corrupt or the end: the kernel will say what it thinks
            if not self.filetype:
                name_len, ftype = name_len | ftype << 8, 0
            name = bytes(block[at + 8 : at + 8 + name_len])
            if number and name not in (b".", b"..") and name_len <= rec_len - 8:
                yield Entry(name, number, (ftype == 2) if self.filetype else None)
            at += rec_len


class _Tree:
    """The written runs of one inode's extent tree, each node read at most once (so a
    shared child or a cycle is refused, not walked again): a child is one level below
    its parent, entries follow one another in logical order within the inode's
    `nblocks`, and no more nodes are read than there are data blocks. As the kernel
    checks them (fs/ext4/extents.c, __ext4_ext_check)."""

    def __init__(self, fs: Ext4, number: int, nblocks: int) -> None:
        self.fs, self.number, self.nblocks = fs, number, nblocks
        self.seen: set[int] = set()
        self.end = 0  # logical block where the last extent ended
        self.out: list[tuple[int, int]] = []  # (physical block, count)
        self.logical: list[int] = []  # the first logical block of each run of `out`

    def runs(self, root: bytes) -> list[tuple[int, int]]:
        depth = struct.unpack_from("<H", root, 6)[0]
        if depth > _MAX_DEPTH:
            raise Damaged(f"inode {self.number}: extent tree {depth} deep")
        self._node(root, depth, 4)
        return self.out

    def _node(self, node: bytes, depth: int, most_allowed: int) -> None:
        magic, entries, most, node_depth = struct.unpack_from("<4H", node, 0)
        if magic != _EXTENT_MAGIC or node_depth != depth or not entries <= most <= most_allowed:
            raise Damaged(f"inode {self.number}: bad extent tree node")
        previous = -1
        for i in range(entries):
            e = 12 + 12 * i
            logical = _u32(node, e)
            if logical <= previous or logical < self.end or logical >= self.nblocks:
                raise Damaged(f"inode {self.number}: extent at block {logical} out of order")
            previous = logical
            if depth == 0:
                self._leaf(logical, _u16(node, e + 4), _u16(node, e + 6) << 32 | _u32(node, e + 8))
                continue
            child = _u32(node, e + 4) | _u16(node, e + 8) << 32
            if child in self.seen:
                raise Damaged(f"inode {self.number}: extent tree block {child} reached twice")
            if len(self.seen) > self.nblocks + 2 * _MAX_DEPTH:
                raise Damaged(f"inode {self.number}: more extent tree blocks than data blocks")
            self.seen.add(child)
            raw = self.fs._read_blocks(child, self.fs.block_size)
            self._node(raw, depth - 1, (self.fs.block_size - 12) // 12)

    def _leaf(self, logical: int, length: int, physical: int) -> None:
        count = length - _UNWRITTEN if length > _UNWRITTEN else length
        if not count or logical + count > self.nblocks:
            raise Damaged(f"inode {self.number}: extent beyond its size")
        self.end = logical + count
        if length <= _UNWRITTEN:
            self.fs._check_blocks(physical, count, f"data of inode {self.number}")
            self.out.append((physical, count))
            self.logical.append(logical)


def _u16(buf: bytes, at: int) -> int:
    return int(struct.unpack_from("<H", buf, at)[0])


def _u32(buf: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", buf, at)[0])
