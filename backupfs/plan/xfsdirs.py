"""XFS version 2/3 directories, read for xfsmeta.py: short-form ones inside the inode,
and block, leaf and node ones from their data blocks (fs/xfs/libxfs/xfs_da_format.h,
xfs_dir2_sf.c, xfs_dir2_data.c).

Every entry lies in the directory's data space, the first 32 GiB of its data fork, in
data blocks of `dir_fsbs` filesystem blocks; the leaf and free index blocks above it only
speed up lookups, so a listing reads the data blocks and nothing else. Entries are
checked as the kernel's verifiers check them (each where its tag says, lengths inside the
block, offsets of a short-form directory increasing, names without '/' or NUL) and a name
twice, an entry naming the directory itself or an inode outside the filesystem is
refused with Damaged.
"""

import os
import struct
from collections.abc import Iterator

from backupfs.plan.xfsmeta import FMT_LOCAL, MAX_DIR_BYTES, Damaged, Dinode, Extent, NotXfs, Xfs

_BLOCK_MAGIC = {4: 0x58443242, 5: 0x58444233}  # "XD2B", "XDB3": a one-block directory
_DATA_MAGIC = {4: 0x58443244, 5: 0x58444433}  # "XD2D", "XDD3": a data block of a bigger one
_DATA_HDR = {4: 16, 5: 64}  # xfs_dir2_data_hdr, xfs_dir3_data_hdr
_LEAF_OFFSET = 1 << 35  # XFS_DIR2_LEAF_OFFSET: where the data space ends
_FREE_TAG = 0xFFFF
_MAX_SHORT_INUM = 0xFFFFFFFF
_READ_BYTES = 1 << 20  # of a directory read at once


def entries(fs: Xfs, d: Dinode) -> list[tuple[str, int]]:
    """(name, inode number) of the directory `d`, without . and .., in on-disk order."""
    if not d.info.is_dir:
        raise NotXfs(f"inode {d.info.number} is not a directory")
    found = _shortform(fs, d) if d.format == FMT_LOCAL else _blocks(fs, d)
    out, names = [], set()
    for name, number in found:
        if name in (b".", b".."):
            continue
        if not name or b"/" in name or b"\0" in name or name in names:
            raise Damaged(f"directory {d.info.number}: bad or repeated name {name!r}")
        if number == d.info.number:
            raise Damaged(f"directory {d.info.number} holds itself as {name!r}")
        fs.locate(number)
        names.add(name)
        out.append((os.fsdecode(name), number))
    return out


def _entsize(fs: Xfs, namelen: int) -> int:
    """Bytes of a data block entry: inode number, name length, name, file type, tag."""
    return (8 + 1 + namelen + fs.ftype + 2 + 7) & ~7


def _shortform(fs: Xfs, d: Dinode) -> list[tuple[bytes, int]]:
    """A short-form directory: a header (count, i8count, parent) then entries of name
    length, offset, name, file type and an inode number of 4 bytes (8 if i8count)."""
    sf, number = d.fork[: d.info.size], d.info.number
    if len(sf) < 6:
        raise Damaged(f"directory {number}: short-form header of {len(sf)} bytes")
    count, i8count = sf[0], sf[1]
    width = 8 if i8count else 4
    at = 2 + width
    wide = int(_ino(sf, 2, width) > _MAX_SHORT_INUM)
    hdr = _DATA_HDR[fs.version]
    next_offset = hdr + _entsize(fs, 1) + _entsize(fs, 2)  # after . and ..
    out = []
    for _ in range(count):
        if at + 3 > len(sf):
            raise Damaged(f"directory {number}: short-form entries past its size")
        namelen, offset = sf[at], struct.unpack_from(">H", sf, at + 1)[0]
        end = at + 3 + namelen + fs.ftype + width
        if not namelen or end > len(sf) or offset < next_offset:
            raise Damaged(f"directory {number}: bad short-form entry at byte {at}")
        next_offset = offset + _entsize(fs, namelen)
        child = _ino(sf, end - width, width)
        wide += int(child > _MAX_SHORT_INUM)
        out.append((bytes(sf[at + 3 : at + 3 + namelen]), child))
        at = end
    if at != len(sf) or wide != i8count or next_offset > fs.block_size * fs.dir_fsbs:
        raise Damaged(
            f"directory {number}: its short-form entries do not add up to {len(sf)} bytes"
        )
    return out


def _ino(buf: bytes, at: int, width: int) -> int:
    return int.from_bytes(buf[at : at + width], "big")


def _blocks(fs: Xfs, d: Dinode) -> Iterator[tuple[bytes, int]]:
    """The entries of a block, leaf or node directory, data block after data block."""
    number, size = d.info.number, d.info.size
    dir_bytes = fs.block_size * fs.dir_fsbs
    if size % dir_bytes or not 0 < size <= _LEAF_OFFSET:
        raise Damaged(f"directory {number}: data space of {size} bytes")
    if size > MAX_DIR_BYTES:
        raise NotXfs(f"directory {number}: {size} bytes, more than this reader lists")
    extents, _ = fs.extents(d)
    if not extents:
        raise Damaged(f"directory {number}: no blocks")
    last = extents[-1]
    one_block = last.offset + last.count == fs.dir_fsbs  # as xfs_dir2_format() decides
    if one_block and size != dir_bytes:
        raise Damaged(f"directory {number}: one block, {size} bytes")
    magic = (_BLOCK_MAGIC if one_block else _DATA_MAGIC)[fs.version]
    for first, raw in _dir_blocks(fs, d, extents, size >> fs.blocklog):
        yield from _data_block(fs, d, raw, first, magic, one_block)


def _dir_blocks(fs: Xfs, d: Dinode, extents: list[Extent], end: int) -> Iterator[tuple[int, bytes]]:
    """(linear block where it starts, bytes) of each directory data block below file
    block `end`, assembled from its extents; a data block with a hole is Damaged."""
    fsbs, bs, number = fs.dir_fsbs, fs.block_size, d.info.number
    part, first, part_index = bytearray(), 0, -1
    for e in extents:
        if e.offset >= end:
            break
        if e.unwritten:
            raise Damaged(f"directory {number}: an unwritten extent")
        pos, stop = e.offset, min(e.offset + e.count, end)
        while pos < stop:
            n = min(stop - pos, max(1, _READ_BYTES // bs))
            data = fs.read_blocks(e.block + pos - e.offset, n)
            for k in range(n):
                index, within = divmod(pos + k, fsbs)
                if within == 0:
                    if part:
                        raise Damaged(f"directory {number}: data block {part_index} has a hole")
                    part_index, first = index, e.block + pos - e.offset + k
                elif index != part_index or len(part) != within * bs:
                    raise Damaged(f"directory {number}: data block {index} has a hole")
                part += data[k * bs : (k + 1) * bs]
                if within == fsbs - 1:
                    yield first, bytes(part)
                    part = bytearray()
            pos += n
    if part:
        raise Damaged(f"directory {number}: data block {part_index} has a hole")


def _data_block(
    fs: Xfs, d: Dinode, raw: bytes, first: int, magic: int, one_block: bool
) -> Iterator[tuple[bytes, int]]:
    """The entries of one data block: entries and unused spans, each 8-byte aligned and
    tagged with its own offset, up to the block's end (a one-block directory's hash
    leaf entries and tail come last)."""
    number, end = d.info.number, len(raw)
    if struct.unpack_from(">I", raw, 0)[0] != magic:
        raise Damaged(f"directory {number}: no directory magic in block {first}")
    if fs.version == 5:
        blkno, owner = struct.unpack_from(">Q", raw, 8)[0], struct.unpack_from(">Q", raw, 40)[0]
        if blkno != fs.daddr(first) or owner != number:
            raise Damaged(f"directory {number}: block {first} is not its own")
    at = _DATA_HDR[fs.version]
    if one_block:
        count, stale = struct.unpack_from(">II", raw, end - 8)
        end -= 8 + 8 * count
        if end < at or stale > count:
            raise Damaged(f"directory {number}: {count} leaf entries in a one-block directory")
    while at < end:
        bad = Damaged(f"directory {number}: bad entry at {at} in block {first}")
        free = at + 8 <= end and struct.unpack_from(">H", raw, at)[0] == _FREE_TAG
        if at + (8 if free else 16) > end:
            raise bad
        namelen = 0 if free else raw[at + 8]
        length = struct.unpack_from(">H", raw, at + 2)[0] if free else _entsize(fs, namelen)
        if length < 8 or length % 8 or at + length > end or not (free or namelen):
            raise bad
        if struct.unpack_from(">H", raw, at + length - 2)[0] != at:
            raise bad
        if not free:
            yield bytes(raw[at + 9 : at + 9 + namelen]), struct.unpack_from(">Q", raw, at)[0]
        at += length
