"""Fetch the metadata of a tree walk in parallel, level by level, before the walk.

`ls -lR`, `grep -r` and restore's scan resolve a tree one dependent read at a time: a
directory block names inodes, an inode locates the next directory blocks. Over a link
with latency each of those reads is a round trip. Reading ext4's structures from the
image ourselves (ext4meta.py), every directory of one tree level, then every inode
those directories name, is fetched at once: a walk of depth D costs about 2·D rounds
of parallel reads instead of one round trip per block. The bytes land in the daemon's
cache and in the page cache of the image file, where the loop device finds them.

The image is hostile: its names become paths that root opens (read plans map the files
found), so an entry whose name is no plain file name (empty, ".", "..", a "/" or a NUL)
or whose path grows past PATH_MAX is skipped and counted. What is read is bounded: a
round's directories are read MAX_ROUND_BYTES at a time, and a walk reads no more data
than its filesystem holds (directories that share blocks are damaged, not walked again).
"""

import bisect
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from backupfs.plan.ext4meta import Damaged, Ext4, Inode, NotExt4, Range
from backupfs.plan.extents import Extent

log = logging.getLogger(__name__)
PAGE = 4096
GAP = 64 << 10  # read across gaps this small: the daemon fetches whole blocks anyway
MAX_READ = 1 << 20  # split longer runs so that they are fetched in parallel
THREADS = 32
MAX_LEVELS = 1024  # deeper than any real tree: a damaged one is not walked forever
MAX_ROUND_BYTES = 32 << 20  # directory data held in memory at once
MAX_PATH_BYTES = 4095  # PATH_MAX: nothing opens a longer path in one go
_NOT_NAMES = (b"", b".", b"..")

# What to walk below a directory: None is everything; a dict names the entries wanted,
# each with what to walk below it (the shape of a --files-from list).
Selection = dict[bytes, "Selection"] | None
# A directory to parse once read: its inode, what to walk below it, its path.
Directory = tuple[Inode, Selection, bytes]
Wanted = dict[int, tuple[Selection, bytes]]  # inodes to read next: as for a Directory
# Ranges to read, and the directory they hold (None: read for the kernel's sake only).
Work = tuple[list[Range], Directory | None]


class ImageReader:
    """Parallel page-aligned preads of the image file inside the backupfs mount."""

    def __init__(self, path: str, pool: ThreadPoolExecutor) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead
        self.pool = pool
        self.bytes_read = 0

    def close(self) -> None:
        os.close(self.fd)

    def read(self, offset: int, length: int) -> bytes:
        self.bytes_read += length
        return os.pread(self.fd, length, offset)

    def read_many(self, ranges: Iterable[Range]) -> "Chunks":
        runs = _runs(ranges)
        data = list(self.pool.map(lambda r: os.pread(self.fd, r[1] - r[0], r[0]), runs))
        self.bytes_read += sum(end - start for start, end in runs)  # counted in this thread
        return Chunks([r[0] for r in runs], data)


def _runs(ranges: Iterable[Range]) -> list[Range]:
    """Page-aligned runs covering `ranges`, merged over small gaps, each at most MAX_READ
    long; disjoint and sorted, so that what many ranges share is read once."""
    runs: list[Range] = []
    for start, end in sorted((s // PAGE * PAGE, -(-e // PAGE) * PAGE) for s, e in ranges):
        if runs:
            first, last = runs[-1]
            if end <= last:
                continue  # read already
            if start <= last + GAP and end - first <= MAX_READ:
                runs[-1] = (first, end)
                continue
            start = max(start, last)
        runs += [(at, min(at + MAX_READ, end)) for at in range(start, end, MAX_READ)]
    return runs


@dataclass
class Chunks:
    starts: list[int]
    data: list[bytes]

    def get(self, start: int, end: int) -> bytes:
        """The bytes of [start, end), which may span runs; short where a read was."""
        i = bisect.bisect_right(self.starts, start) - 1
        parts = []
        while start < end and 0 <= i < len(self.starts):
            base = self.starts[i]
            piece = self.data[i][start - base : end - base]
            if not piece:
                break
            parts.append(piece)
            start, i = start + len(piece), i + 1
            if i < len(self.starts) and self.starts[i] != start:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)


@dataclass(frozen=True)
class FileMap:
    rel: bytes  # path below the walk's start
    size: int
    extents: list[Extent] | None  # None: not all in the inode (FIEMAP knows them)


@dataclass
class Walked:
    directories: int = 0
    inodes: int = 0
    rounds: int = 0
    bytes_read: int = 0
    errors: list[str] = field(default_factory=list)
    skipped_names: int = 0  # entries whose name cannot be a path, or too long a path
    # Every regular file walked, by inode number (hard links once): a read plan for them
    # needs no FIEMAP where the inode held the extents.
    files: dict[int, FileMap] = field(default_factory=dict)


def prefetch(
    image: str,
    partition_start: int,
    starts: list[tuple[int, Selection]],
    stop: Callable[[], bool] | None = None,
) -> Walked:
    """Walk from the directories `starts` (inode number, selection) in the ext2/3/4
    filesystem at `partition_start` of `image`, reading every directory block, inode,
    xattr block and long symlink the selection covers. Best effort: a filesystem this
    cannot read is left to the kernel's own reads. `stop`, asked before each round, ends
    the walk early (the daemon's fill yields to a restore)."""
    walked = Walked()
    with ThreadPoolExecutor(THREADS) as pool:
        try:
            reader = ImageReader(image, pool)
        except OSError as exc:
            walked.errors.append(str(exc))
            return walked
        try:
            fs = Ext4(reader.read, partition_start, reader.size - partition_start)
            _walk(fs, reader, starts, walked, stop)
        except (NotExt4, OSError, IndexError, ValueError, OverflowError, struct.error) as exc:
            log.info("metadata prefetch stopped: %s", exc)
            walked.errors.append(str(exc))
        finally:
            walked.bytes_read = reader.bytes_read
            reader.close()
    if walked.skipped_names:
        log.info("metadata prefetch skipped %d entries whose names cannot be paths",
                 walked.skipped_names)  # fmt: skip
    return walked


def _walk(
    fs: Ext4,
    reader: ImageReader,
    starts: list[tuple[int, Selection]],
    w: Walked,
    stop: Callable[[], bool] | None = None,
) -> None:
    wanted: Wanted = {n: (sel, b"") for n, sel in starts}
    seen: set[int] = set()  # directories and symlinks read: a damaged tree may loop
    xattrs: set[int] = set()  # xattr blocks read: many inodes may share one
    budget = fs.blocks_count * fs.block_size  # a real tree's data fits in its filesystem
    while wanted and w.rounds < MAX_LEVELS and not (stop is not None and stop()):
        w.rounds += 1
        chunks = reader.read_many(fs.inode_range(n) for n in wanted)
        inodes = [(fs.parse_inode(n, chunks.get(*fs.inode_range(n))), sel, rel)
                  for n, (sel, rel) in wanted.items()]  # fmt: skip
        del chunks
        w.inodes += len(inodes)
        work: list[Work] = []  # directory blocks; xattr blocks and long symlinks
        for inode, sel, rel in inodes:
            if inode.xattr_block and inode.xattr_block not in xattrs:
                xattrs.add(inode.xattr_block)
                at = fs.start + inode.xattr_block * fs.block_size
                work.append(([(at, at + fs.block_size)], None))
            if inode.is_file and rel:  # (a start that is no directory is damaged)
                w.files[inode.number] = FileMap(rel, inode.size, fs.inode_extents(inode))
            elif (inode.is_dir or inode.is_symlink) and inode.number not in seen:
                seen.add(inode.number)
                w.directories += inode.is_dir
                work.append((fs.data_ranges(inode), (inode, sel, rel) if inode.is_dir else None))
        budget -= sum(end - start for ranges, _ in work for start, end in ranges)
        if budget < 0:
            raise Damaged("its directories hold more data than the filesystem")
        wanted = {}
        for batch in _batches(work):
            chunks = reader.read_many(r for ranges, _ in batch for r in ranges)
            for ranges, directory in batch:
                if directory is not None:
                    data = b"".join(chunks.get(*r) for r in ranges)
                    _take_entries(fs, directory, data, wanted, w)


def _take_entries(fs: Ext4, directory: Directory, data: bytes, wanted: Wanted, w: Walked) -> None:
    """Add the entries of one directory (those its selection names) to `wanted`."""
    inode, sel, rel = directory
    for entry in fs.entries(inode, data):
        if sel is not None and entry.name not in sel:
            continue
        path = rel + b"/" + entry.name if rel else entry.name
        if entry.name in _NOT_NAMES or b"/" in entry.name or b"\0" in entry.name:
            w.skipped_names += 1  # names from the image: never a path that leaves the tree
        elif len(path) > MAX_PATH_BYTES:
            w.skipped_names += 1
        else:
            wanted[entry.inode] = (None if sel is None else sel[entry.name], path)


def _batches(work: list[Work]) -> Iterator[list[Work]]:
    """`work` in order, cut where the data of a batch would pass MAX_ROUND_BYTES."""
    batch: list[Work] = []
    size = 0
    for item in work:
        length = sum(end - start for start, end in item[0])
        if batch and size + length > MAX_ROUND_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += length
    if batch:
        yield batch


def selection(rels: Iterable[str]) -> Selection:
    """The selection of relative paths (a --files-from list): each path with everything
    below it, and the directories on the way to it."""
    top: dict[bytes, Selection] = {}
    for rel in rels:
        parts = [os.fsencode(p) for p in os.path.normpath(rel.strip("/")).split("/")]
        node: dict[bytes, Selection] | None = top
        for i, part in enumerate(parts):
            if node is None:
                break  # already walked whole, by a shorter path
            if i == len(parts) - 1:
                node[part] = None
            else:
                child = node.setdefault(part, {})
                node = child
    return top
