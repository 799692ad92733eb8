"""What a fill reads first: the metadata of the ext2/3/4 filesystems on a disk (every
directory block and inode, as `restore` walks them: plan/metaprefetch.py), so `ls -lR`,
`find` and the directory half of `grep -r` find it in the page cache.

The walk reads the served file through the mount itself, from worker threads (the daemon
answers those reads like anyone's), so the bytes land in the kernel's page cache of the
file, where loop devices over it find them. Filesystems are looked for where a disk
keeps them: at its start, and at each partition a GPT or an MBR (primary entries) lists.
The tables are the image's word: at most MAX_PARTITIONS entries are read, an entry
outside the disk is ignored, and a start that holds no ext superblock costs one read.
"""

import logging
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from backupfs.plan import metaprefetch
from backupfs.plan.ext4meta import Damaged, Ext4, NotExt4

log = logging.getLogger(__name__)
SECTOR = 512
MAX_PARTITIONS = 128
EXT_MAGIC = b"\x53\xef"  # s_magic, at 1024 + 56 from the filesystem's start
_NOT_FILESYSTEMS = {0x00, 0x05, 0x0F, 0x85, 0xEE}  # empty, extended, GPT protective
ROOT_INODE = 2
PAGE = 4096
MERGE_GAP = 256 << 10  # fetch across free gaps this small: one request beats two
_BLOCK_UNINIT = 0x2  # bg_flags: the group's block bitmap is not initialised
MAX_BITMAP_GROUPS = 8192  # 1 TiB at 4 KiB blocks: 32 MiB of bitmaps, scanned in Python

Range = tuple[int, int]

Read = Callable[[int, int], bytes]


def partition_starts(read: Read, size: int) -> list[int]:
    """Byte offsets where the GPT (else the MBR) says partitions start."""
    header = read(SECTOR, 92)
    starts: list[int] = []
    if header[:8] == b"EFI PART":
        entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
        if not 128 <= entry_size <= 4096 or entry_size % 8:
            return []
        count = min(count, MAX_PARTITIONS)
        table = read(entries_lba * SECTOR, count * entry_size) if entries_lba < size else b""
        for i in range(len(table) // entry_size):
            entry = table[i * entry_size : (i + 1) * entry_size]
            if entry[:16].strip(b"\0"):
                starts.append(struct.unpack_from("<Q", entry, 32)[0] * SECTOR)
    else:
        mbr = read(0, SECTOR)
        if len(mbr) == SECTOR and mbr[510:] == b"\x55\xaa":
            for i in range(4):
                kind, lba = mbr[446 + 16 * i + 4], struct.unpack_from("<I", mbr, 446 + 16 * i + 8)
                if kind not in _NOT_FILESYSTEMS:
                    starts.append(lba[0] * SECTOR)
    return sorted({s for s in starts if 0 < s < size})


def ext_starts(read: Read, size: int) -> list[int]:
    """Where ext2/3/4 filesystems start on the disk: the disk itself or its partitions."""
    return [s for s in [0, *partition_starts(read, size)] if read(s + 1080, 2) == EXT_MAGIC]


@dataclass
class Layout:
    """Where a disk's ext filesystems start, and what the fill's data pass reads: their
    allocated blocks (by their block bitmaps) and everything outside them, in order."""

    ext_starts: list[int] = field(default_factory=list)
    ranges: list[Range] = field(default_factory=list)


def layout(path: str) -> Layout:
    """The layout of the disk at `path` (blocking: run it in a thread): a few reads (the
    tables, superblocks, group descriptors, block bitmaps). Nothing readable: empty."""
    found = Layout()
    try:
        with ThreadPoolExecutor(metaprefetch.THREADS) as pool:
            reader = metaprefetch.ImageReader(path, pool)
            try:
                found.ext_starts = ext_starts(reader.read, reader.size)
                found.ranges = _data_ranges(_spans(found.ext_starts, reader), reader.size)
            finally:
                reader.close()
    except OSError as exc:
        log.info("fill: cannot read %s: %s", path, exc)
    return found


Span = tuple[int, int, list[Range]]  # a filesystem: start, end, its allocated ranges


def _spans(starts: list[int], reader: metaprefetch.ImageReader) -> list[Span]:
    spans = []
    for start in starts:
        try:
            fs = Ext4(reader.read, start, reader.size - start)
            spans.append((start, start + fs.blocks_count * fs.block_size, allocated(fs, reader)))
        except (NotExt4, Damaged, struct.error) as exc:
            log.info("fill: no block bitmaps for the filesystem at %d: %s", start, exc)
    return spans


def walk_metadata(path: str, starts: list[int], stop: Callable[[], bool]) -> int:
    """Read every directory block and inode of the ext filesystems at `starts` of the
    disk at `path` (blocking: run it in a thread), until `stop()`; the bytes read."""
    total = 0
    for start in starts:
        if stop():
            break
        walked = metaprefetch.prefetch(path, start, [(ROOT_INODE, None)], stop)
        log.info("fill: metadata of the ext filesystem at %d of %s: %d directories, %d "
                 "inodes, %d bytes", start, path, walked.directories, walked.inodes,
                 walked.bytes_read)  # fmt: skip
        total += walked.bytes_read
    return total


def allocated(fs: Ext4, reader: metaprefetch.ImageReader) -> list[Range]:
    """Byte ranges of the blocks the filesystem's block bitmaps mark in use (metadata
    included), merged over gaps under MERGE_GAP; a group whose bitmap is uninitialised
    counts as in use whole (the kernel would compute it), a bigalloc one too; so does a
    filesystem of more than MAX_BITMAP_GROUPS groups (its bitmaps would take long to scan
    here)."""
    bs, per = fs.block_size, fs.blocks_per_group
    if fs.groups > MAX_BITMAP_GROUPS:
        return [(fs.start, fs.start + fs.blocks_count * bs)]
    groups, whole = [], []
    for g in range(fs.groups):
        at = g * fs.desc_size
        bitmap, flags = struct.unpack_from("<I14xH", fs.gdt, at)
        if fs.desc_size >= 64:
            bitmap |= struct.unpack_from("<I", fs.gdt, at + 0x20)[0] << 32
        first = fs.first_data_block + g * per
        count = min(per, fs.blocks_count - first)
        if fs.cluster_shift or flags & _BLOCK_UNINIT:
            whole.append((first, count))
        elif fs.first_data_block < bitmap < fs.blocks_count:
            groups.append((first, count, fs.start + bitmap * bs))
    chunks = reader.read_many((b, b + bs) for _, _, b in groups)
    runs = list(whole)
    for first, count, at in groups:
        bits = chunks.get(at, at + bs)
        runs += [(first + lo, hi - lo) for lo, hi in _set_runs(bits, count)]
    out: list[Range] = []
    for block, n in sorted(runs):
        lo, hi = fs.start + block * bs, fs.start + (block + n) * bs
        if out and lo - out[-1][1] <= MERGE_GAP:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _set_runs(bits: bytes, count: int) -> list[Range]:
    """[lo, hi) runs of set bits among the first `count` bits (bit 0 of byte 0 first)."""
    runs: list[Range] = []
    start = None
    n = min(count, 8 * len(bits))
    i = 0
    while i < n:
        byte = bits[i >> 3]
        if not i & 7 and i + 8 <= n and byte in (0, 0xFF):  # whole bytes: most of them
            if byte and start is None:
                start = i
            elif not byte and start is not None:
                runs.append((start, i))
                start = None
            i += 8
            continue
        if byte >> (i & 7) & 1:
            if start is None:
                start = i
        elif start is not None:
            runs.append((start, i))
            start = None
        i += 1
    if start is not None:
        runs.append((start, n))
    return runs


def _data_ranges(spans: list[Span], size: int) -> list[Range]:
    """The data pass's ranges: inside each filesystem its allocated ranges, the rest of
    the disk whole; page-aligned (a partial page is never marked up to date)."""
    out: list[Range] = []
    pos = 0
    for start, end, used in sorted(spans):
        if start > pos:
            out.append((pos, start))
        out += used
        pos = max(pos, end)
    if pos < size:
        out.append((pos, size))
    return [(lo // PAGE * PAGE, min(size, -(-hi // PAGE) * PAGE)) for lo, hi in out if hi > lo]
