"""XFS on-disk metadata, read from the disk image itself: the superblock, inodes by number,
their data forks (extent lists and bmap B+trees) and, through xfsdirs.py, directories.
The `FsReader` of plan/fsmeta.py for XFS, so find/log/diff/cat need no kernel mount.

Layout: the kernel's Documentation/filesystems/xfs/ and fs/xfs/libxfs/xfs_format.h,
xfs_da_format.h (all fields big-endian). An inode number is the AG number above
`agblklog + inopblog` bits, then the block in the AG, then the inode in the block.

The image is hostile input: every count, size, level and block number is checked before
it is used, against what the geometry allows and the kernel's verifiers enforce
(xfs_sb.c, xfs_inode_buf.c, xfs_bmap_btree.c, xfs_dir2_*.c): each bmap B+tree block is
read at most once, one level below its parent, and no more of them than the inode owns
blocks; extents must follow one another inside their AG. Anything else raises Damaged.

Supported: v5 (CRC) and v4 filesystems with version 2 directories, any block, sector,
inode and directory block size, bigtime and nrext64 inodes, short-form, block, leaf and
node directories, inline and remote symlinks, extent-list and bmap B+tree data forks;
holes and unwritten (preallocated) extents read as zeros. Not supported, or ignored:
file data on a realtime device (data_runs raises NotXfs), attribute forks and CoW forks
(ignored), checksums (not verified: the structure is), a dirty log (not replayed: what
is in place on disk is read), v4 without version 2 directories and unknown v5
incompatible features (NotXfs), and directories of more than MAX_DIR_BYTES (NotXfs).
Case-insensitive (version=ci) directories are listed by their stored names.
"""

import struct
import threading
from dataclasses import dataclass

from backupfs.plan.fsmeta import (
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    DataRun,
    FileInfo,
    FsError,
    Range,
    Read,
)

_SB_MAGIC, _INODE_MAGIC = 0x58465342, 0x494E  # "XFSB", "IN"
_BMAP_MAGIC = {4: 0x424D4150, 5: 0x424D4133}  # "BMAP", "BMA3"
_SYMLINK_MAGIC = 0x58534C4D  # "XSLM"
_SYMLINK_HDR = 56  # struct xfs_dsymlink_hdr (v5)
_SYMLINK_MAXLEN = 1024
_VERSION_DIRV2, _VERSION_MOREBITS = 0x2000, 0x8000
_FEATURES2_FTYPE = 0x200
_INCOMPAT_FTYPE, _INCOMPAT_NEEDSREPAIR = 0x1, 0x10
_INCOMPAT_KNOWN = 0x1FF  # ftype spinodes meta_uuid bigtime needsrepair nrext64 exchange
#                          parent metadir: none moves an inode, a fork or a directory
_DIFLAG_REALTIME = 0x1
_DIFLAG2_BIGTIME, _DIFLAG2_NREXT64 = 1 << 3, 1 << 4
FMT_DEV, FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 0, 1, 2, 3
_FORMATS = {  # the data fork formats each file type may have (xfs_dinode_verify_fork)
    S_IFREG: (FMT_EXTENTS, FMT_BTREE),
    S_IFDIR: (FMT_LOCAL, FMT_EXTENTS, FMT_BTREE),
    S_IFLNK: (FMT_LOCAL, FMT_EXTENTS, FMT_BTREE),
    0o020000: (FMT_DEV,),  # character device
    0o060000: (FMT_DEV,),  # block device
    0o010000: (FMT_DEV,),  # fifo
    0o140000: (FMT_DEV,),  # socket
}
_MAX_LEVELS = 9  # of a bmap B+tree (XFS_BTREE_MAXLEVELS)
_MAX_FILEOFF = 1 << 54  # in blocks (XFS_MAX_FILEOFF + 1)
_BIGTIME_OFFSET_NS = (1 << 31) * 10**9  # bigtime counts from 1901-12-13T20:45:52Z
_CACHED_INODES = 256
# The most data space of one directory this reader lists: about a million entries. A
# larger directory is left to the kernel.
MAX_DIR_BYTES = 64 << 20


class NotXfs(FsError):
    """Not an XFS filesystem this module can read, or something in it it does not read."""


class Damaged(NotXfs):
    """Metadata no mkfs.xfs or kernel writes (corrupt or crafted), refused before use."""


@dataclass(frozen=True)
class Extent:
    offset: int  # in the file, in filesystem blocks
    block: int  # linear: AG number * agblocks + block in the AG
    count: int
    unwritten: bool


@dataclass(frozen=True)
class Dinode:
    info: FileInfo
    format: int  # of the data fork: FMT_*
    fork: bytes  # the data fork as it lies in the inode (up to the attribute fork)
    fork_at: int  # where the data fork starts in the image
    nextents: int
    nblocks: int  # blocks the inode owns: data, bmap B+tree, attributes
    realtime: bool


class Xfs:
    """One XFS filesystem starting at byte `start` of an image read with `read`;
    `size_bytes`, when known, is how much of the image from `start` it may occupy.
    Safe to use from several threads at once."""

    def __init__(self, read: Read, start: int, size_bytes: int | None = None) -> None:
        self.read, self.start = read, start
        sb = read(start, 512)
        if len(sb) < 512 or _u32(sb, 0) != _SB_MAGIC:
            raise NotXfs("no XFS superblock")
        bs, self.dblocks, self.agblocks, self.agcount = (
            _u32(sb, 4), _u64(sb, 8), _u32(sb, 84), _u32(sb, 88))  # fmt: skip
        versionnum, sectsize, isize = _u16(sb, 100), _u16(sb, 102), _u16(sb, 104)
        blocklog, sectlog, inodelog, inopblog, agblklog = sb[120:125]
        version = self.version = versionnum & 0xF
        if version == 5:
            incompat = _u32(sb, 216)
            if incompat & ~_INCOMPAT_KNOWN or incompat & _INCOMPAT_NEEDSREPAIR:
                raise NotXfs(f"XFS incompatible features {incompat:#x}")
            self.ftype = bool(incompat & _INCOMPAT_FTYPE)
        elif version == 4 and versionnum & _VERSION_DIRV2:
            more = versionnum & _VERSION_MOREBITS
            self.ftype = bool(more and _u32(sb, 200) & _FEATURES2_FTYPE)
        else:
            raise NotXfs(f"XFS version {versionnum:#x}: not v4 with v2 directories or v5")
        if sb[126]:
            raise Damaged("mkfs.xfs did not finish this filesystem")
        if not 9 <= sectlog <= 15 or sectsize != 1 << sectlog:
            raise Damaged(f"sector size {sectsize} (log {sectlog})")
        if not max(sectlog, 9 if version == 4 else 10) <= blocklog <= 16 or bs != 1 << blocklog:
            raise Damaged(f"block size {bs} (log {blocklog})")
        low = 8 if version == 4 else 9
        if not low <= inodelog <= min(11, blocklog) or isize != 1 << inodelog:
            raise Damaged(f"inode size {isize} (log {inodelog})")
        if inopblog != blocklog - inodelog or _u16(sb, 106) != 1 << inopblog:
            raise Damaged(f"{_u16(sb, 106)} inodes per block")
        if not 64 <= self.agblocks < 1 << 31 or agblklog != (self.agblocks - 1).bit_length():
            raise Damaged(f"{self.agblocks} blocks per AG")
        if self.agcount < 1 or not (
            (self.agcount - 1) * self.agblocks < self.dblocks <= self.agcount * self.agblocks
        ):
            raise Damaged(f"{self.dblocks} blocks in {self.agcount} AGs of {self.agblocks}")
        if size_bytes is not None and self.dblocks * bs > size_bytes:
            raise Damaged(f"{self.dblocks} blocks of {bs} bytes: more than the device")
        if sb[192] > 16 - blocklog:
            raise Damaged(f"directory block log {sb[192]}")
        self.block_size, self.blocklog, self.inode_size = bs, blocklog, isize
        self.inopblog, self.agblklog, self.agshift = inopblog, agblklog, agblklog + inopblog
        self.dir_fsbs = 1 << sb[192]  # filesystem blocks in a directory block
        self.core_size = 176 if version == 5 else 100
        self.min_agbno = 3 * sectsize // bs + 1  # the first block after the AG headers
        self.rt = bool(_u64(sb, 16))
        self._cache: dict[int, Dinode] = {}
        self._lock = threading.Lock()
        self.root = _u64(sb, 56)
        if not self.inode(self.root).is_dir:
            raise Damaged(f"the root inode {self.root} is not a directory")

    # -- geometry

    def _ag_size(self, agno: int) -> int:
        return min(self.agblocks, self.dblocks - agno * self.agblocks)

    def fsblock(self, fsbno: int, count: int, what: str) -> int:
        """The linear block of an on-disk block number (AG number << agblklog | block in
        the AG), checked to start `count` blocks inside one AG."""
        agno, agbno = fsbno >> self.agblklog, fsbno & ((1 << self.agblklog) - 1)
        if agno >= self.agcount or agbno < self.min_agbno or agbno + count > self._ag_size(agno):
            raise Damaged(f"{what} at block {fsbno:#x} (+{count}) outside the filesystem")
        return agno * self.agblocks + agbno

    def at(self, block: int) -> int:
        """The image offset of linear block `block`."""
        return self.start + block * self.block_size

    def daddr(self, block: int) -> int:
        """The 512-byte sector number XFS stamps in a v5 block's header."""
        return block << (self.blocklog - 9)

    def read_blocks(self, block: int, count: int) -> bytes:
        length = count * self.block_size
        data = self.read(self.at(block), length)
        if len(data) != length:
            raise Damaged(f"short read at block {block}")
        return data

    def locate(self, number: int) -> int:
        """Where inode `number`'s record starts in the image, or Damaged."""
        agno, agino = number >> self.agshift, number & ((1 << self.agshift) - 1)
        agbno = agino >> self.inopblog
        if number < 0 or agno >= self.agcount or not self.min_agbno <= agbno < self._ag_size(agno):
            raise Damaged(f"inode {number} outside the filesystem")
        index = agino & ((1 << self.inopblog) - 1)
        return self.at(agno * self.agblocks + agbno) + index * self.inode_size

    # -- inodes

    def inode(self, number: int) -> FileInfo:
        return self.dinode(number).info

    def dinode(self, number: int) -> Dinode:
        with self._lock:
            cached = self._cache.get(number)
        if cached is not None:
            return cached
        at = self.locate(number)
        raw = self.read(at, self.inode_size)
        if len(raw) != self.inode_size:
            raise Damaged(f"short read of inode {number}")
        dinode = self._parse(number, at, raw)
        with self._lock:
            if len(self._cache) >= _CACHED_INODES:
                self._cache.clear()
            self._cache[number] = dinode
        return dinode

    def _parse(self, number: int, at: int, raw: bytes) -> Dinode:
        magic, mode, version, fmt = struct.unpack_from(">HHBB", raw, 0)
        if magic != _INODE_MAGIC:
            raise Damaged(f"inode {number}: no inode magic")
        if version not in ((3,) if self.version == 5 else (1, 2)):
            raise Damaged(f"inode {number}: version {version}")
        flags2 = _u64(raw, 120) if version == 3 else 0
        if version == 3 and _u64(raw, 152) != number:
            raise Damaged(f"inode {number}: the record says it is inode {_u64(raw, 152)}")
        kind = mode & S_IFMT
        if fmt not in _FORMATS.get(kind, ()):
            raise Damaged(f"inode {number}: mode {mode:o} with data fork format {fmt}")
        size, nblocks = _u64(raw, 56), _u64(raw, 64)
        nextents = _u64(raw, 24) if flags2 & _DIFLAG2_NREXT64 else _u32(raw, 76)
        literal = self.inode_size - self.core_size
        forkoff = raw[82] * 8
        if forkoff >= literal:
            raise Damaged(f"inode {number}: attribute fork at {forkoff}")
        fork_size = forkoff or literal
        if size >= 1 << 63 or nblocks > self.dblocks and not self.rt:
            raise Damaged(f"inode {number}: {size} bytes in {nblocks} blocks")
        if fmt == FMT_LOCAL and size > fork_size:
            raise Damaged(f"inode {number}: {size} bytes inline in {fork_size}")
        if fmt == FMT_EXTENTS and nextents * 16 > fork_size:
            raise Damaged(f"inode {number}: {nextents} extents in {fork_size} bytes")
        if fmt == FMT_BTREE and not 0 < nextents <= min(nblocks, self.dblocks):
            raise Damaged(f"inode {number}: {nextents} extents in {nblocks} blocks")
        if flags2 & _DIFLAG2_BIGTIME:
            mtime_ns = _u64(raw, 40) - _BIGTIME_OFFSET_NS
        else:
            sec, nsec = struct.unpack_from(">iI", raw, 40)
            mtime_ns = sec * 10**9 + nsec
        nlink = _u16(raw, 6) if version == 1 else _u32(raw, 16)
        uid, gid = _u32(raw, 8), _u32(raw, 12)
        info = FileInfo(number, mode, size, mtime_ns, uid, gid, nlink, (at, at + len(raw)))
        fork_at = self.core_size
        fork = bytes(raw[fork_at : fork_at + fork_size])
        realtime = bool(_u16(raw, 90) & _DIFLAG_REALTIME)
        return Dinode(info, fmt, fork, at + fork_at, nextents, nblocks, realtime)

    # -- data forks

    def extents(self, d: Dinode) -> tuple[list[Extent], list[Range]]:
        """The data fork's extents in file order, and the image ranges of its bmap
        B+tree blocks (none for an extent list)."""
        if d.format == FMT_EXTENTS:
            return _Records(self, d).add(d.fork[: 16 * d.nextents]).out, []
        if d.format == FMT_BTREE:
            return _Btree(self, d).walk()
        return [], []

    def entries(self, directory: FileInfo) -> list[tuple[str, int]]:
        from backupfs.plan.xfsdirs import entries  # xfsdirs builds on this module

        return entries(self, self.dinode(directory.number))

    def data_runs(self, info: FileInfo) -> list[DataRun]:
        d = self.dinode(info.number)
        if not (d.info.is_file or d.info.is_symlink) or d.format == FMT_DEV:
            return []
        if d.info.is_symlink and d.info.size > _SYMLINK_MAXLEN:
            raise Damaged(f"inode {info.number}: a symlink of {d.info.size} bytes")
        if d.format == FMT_LOCAL:
            return [DataRun(0, d.fork_at, d.info.size)] if d.info.size else []
        if d.realtime:
            raise NotXfs(f"inode {info.number}: its data is on the realtime device")
        if d.info.is_symlink and d.nextents > 3:  # XFS_SYMLINK_MAPS
            raise Damaged(f"inode {info.number}: a symlink in {d.nextents} extents")
        extents, _ = self.extents(d)
        if d.info.is_symlink and self.version == 5:
            return self._symlink_runs(d, extents)
        runs, bs, size = [], self.block_size, d.info.size
        for e in extents:
            offset = e.offset * bs
            if e.unwritten or offset >= size:
                continue
            runs.append(DataRun(offset, self.at(e.block), min(e.count * bs, size - offset)))
        return runs

    def _symlink_runs(self, d: Dinode, extents: list[Extent]) -> list[DataRun]:
        """A v5 remote symlink: each extent starts with a header saying which bytes of
        the target follow it (xfs_symlink_remote.c)."""
        runs, done, number = [], 0, d.info.number
        for e in extents:
            if done >= d.info.size:
                break
            if e.unwritten:
                raise Damaged(f"inode {number}: a symlink in an unwritten extent")
            head = self.read(self.at(e.block), _SYMLINK_HDR)
            if len(head) != _SYMLINK_HDR:
                raise Damaged(f"short read at block {e.block}")
            magic, offset, length = struct.unpack_from(">III", head, 0)
            most = min(e.count * self.block_size - _SYMLINK_HDR, d.info.size - done)
            own = _u64(head, 32) == number and _u64(head, 40) == self.daddr(e.block)
            if magic != _SYMLINK_MAGIC or offset != done or not own or not 0 < length <= most:
                raise Damaged(f"inode {number}: bad symlink block {e.block}")
            runs.append(DataRun(done, self.at(e.block) + _SYMLINK_HDR, length))
            done += length
        if done != d.info.size:
            raise Damaged(f"inode {number}: symlink blocks hold {done} of {d.info.size} bytes")
        return runs

    def metadata_ranges(self, info: FileInfo) -> list[Range]:
        """A short-form directory's inode record; else all its directory blocks (data,
        leaf and free index) and the blocks of its bmap B+tree."""
        d = self.dinode(info.number)
        if not d.info.is_dir:
            return []
        if d.format == FMT_LOCAL:
            return [d.info.record]
        extents, tree = self.extents(d)
        bs = self.block_size
        return [(self.at(e.block), self.at(e.block) + e.count * bs) for e in extents] + tree


class _Records:
    """Extent records decoded and checked in file order: each one after the last, with
    blocks inside one AG, and no more of them than the inode says it has."""

    def __init__(self, fs: Xfs, d: Dinode) -> None:
        self.fs, self.d = fs, d
        self.out: list[Extent] = []
        self.end = 0  # file block where the last extent ended

    def add(self, raw: bytes) -> "_Records":
        """The records packed in `raw`, 16 bytes each."""
        number, what = self.d.info.number, f"an extent of inode {self.d.info.number}"
        if len(self.out) + len(raw) // 16 > self.d.nextents:
            raise Damaged(f"inode {number}: more extents than its {self.d.nextents}")
        for l0, l1 in struct.iter_unpack(">QQ", raw):
            offset, count = (l0 >> 9) & (_MAX_FILEOFF - 1), l1 & 0x1FFFFF
            if not count or offset < self.end or offset + count > _MAX_FILEOFF:
                raise Damaged(f"inode {number}: bad extent at file block {offset} (+{count})")
            self.end = offset + count
            block = self.fs.fsblock((l0 & 0x1FF) << 43 | l1 >> 21, count, what)
            self.out.append(Extent(offset, block, count, bool(l0 >> 63)))
        return self


class _Btree:
    """The extents of a bmap B+tree data fork: the root in the inode, its blocks read
    one level at a time, each at most once (xfs_bmap_btree.c, xfs_iread_extents)."""

    def __init__(self, fs: Xfs, d: Dinode) -> None:
        self.fs, self.d = fs, d
        self.records = _Records(fs, d)
        self.seen: set[int] = set()
        self.ranges: list[Range] = []
        hdr = 72 if fs.version == 5 else 24
        self.hdr, self.node_max = hdr, (fs.block_size - hdr) // 16

    def walk(self) -> tuple[list[Extent], list[Range]]:
        root, number = self.d.fork, self.d.info.number
        level, numrecs = _u16(root, 0), _u16(root, 2)
        most = (len(root) - 4) // 16  # xfs_bmdr_maxrecs of the fork
        if not 0 < level < _MAX_LEVELS or not 0 < numrecs <= most:
            raise Damaged(f"inode {number}: bmap B+tree root of level {level}, {numrecs} keys")
        self._children(root, 4, 4 + most * 8, numrecs, level)
        if len(self.records.out) != self.d.nextents:
            raise Damaged(f"inode {number}: {len(self.records.out)} of {self.d.nextents} extents")
        return self.records.out, self.ranges

    def _children(self, node: bytes, keys: int, ptrs: int, numrecs: int, level: int) -> None:
        number, previous = self.d.info.number, -1
        for i in range(numrecs):
            key = _u64(node, keys + 8 * i)
            if key <= previous or key < self.records.end:
                raise Damaged(f"inode {number}: bmap B+tree keys out of order")
            previous, first = key, len(self.records.out)
            self._block(_u64(node, ptrs + 8 * i), level - 1)
            if self.records.out[first].offset < key:
                raise Damaged(f"inode {number}: bmap B+tree key {key} above its extents")

    def _block(self, fsbno: int, level: int) -> None:
        fs, number = self.fs, self.d.info.number
        block = fs.fsblock(fsbno, 1, f"a bmap B+tree block of inode {number}")
        if block in self.seen:
            raise Damaged(f"inode {number}: bmap B+tree block {block} reached twice")
        if len(self.seen) >= min(self.d.nblocks, fs.dblocks):
            raise Damaged(f"inode {number}: more bmap B+tree blocks than its blocks")
        self.seen.add(block)
        raw = fs.read_blocks(block, 1)
        magic, got_level, numrecs = struct.unpack_from(">IHH", raw, 0)
        if magic != _BMAP_MAGIC[fs.version] or got_level != level or numrecs > self.node_max:
            raise Damaged(f"inode {number}: bad bmap B+tree block {block}")
        if not numrecs:
            raise Damaged(f"inode {number}: bad bmap B+tree block {block}")
        if fs.version == 5 and (_u64(raw, 24) != fs.daddr(block) or _u64(raw, 56) != number):
            raise Damaged(f"inode {number}: bmap B+tree block {block} is not its own")
        self.ranges.append((fs.at(block), fs.at(block + 1)))
        if level == 0:
            self.records.add(raw[self.hdr : self.hdr + 16 * numrecs])
        else:
            self._children(raw, self.hdr, self.hdr + self.node_max * 8, numrecs, level)


def _u16(buf: bytes, at: int) -> int:
    return int(struct.unpack_from(">H", buf, at)[0])


def _u32(buf: bytes, at: int) -> int:
    return int(struct.unpack_from(">I", buf, at)[0])


def _u64(buf: bytes, at: int) -> int:
    return int(struct.unpack_from(">Q", buf, at)[0])
