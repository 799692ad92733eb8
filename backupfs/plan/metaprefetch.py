"""Fetch the metadata of a tree walk in parallel, level by level, before the walk.

`ls -lR`, `grep -r` and restore's scan resolve a tree one dependent read at a time: a
directory block names inodes, an inode locates the next directory blocks. Over a link
with latency each of those reads is a round trip. Reading ext4's structures from the
image ourselves (ext4meta.py), every directory of one tree level, then every inode
those directories name, is fetched at once: a walk of depth D costs about 2·D rounds
of parallel reads instead of one round trip per block. The bytes land in the daemon's
cache and in the page cache of the image file, where the loop device finds them.
"""

import bisect
import logging
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from backupfs.plan.ext4meta import Ext4, Inode, NotExt4, Range
from backupfs.plan.extents import Extent

log = logging.getLogger(__name__)
PAGE = 4096
GAP = 64 << 10  # read across gaps this small: the daemon fetches whole blocks anyway
MAX_READ = 1 << 20  # split longer runs so that they are fetched in parallel
THREADS = 32
MAX_LEVELS = 1024  # deeper than any real tree: a damaged one is not walked forever

# What to walk below a directory: None is everything; a dict names the entries wanted,
# each with what to walk below it (the shape of a --files-from list).
Selection = dict[bytes, "Selection"] | None


class ImageReader:
    """Parallel page-aligned preads of the image file inside the backupfs mount."""

    def __init__(self, path: str, pool: ThreadPoolExecutor) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
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
    """Page-aligned runs covering `ranges`, merged over small gaps, at most MAX_READ."""
    runs: list[Range] = []
    for start, end in sorted((s // PAGE * PAGE, -(-e // PAGE) * PAGE) for s, e in ranges):
        if runs and start <= runs[-1][1] + GAP and end - runs[-1][0] <= MAX_READ:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return runs


@dataclass
class Chunks:
    starts: list[int]
    data: list[bytes]

    def get(self, start: int, end: int) -> bytes:
        i = bisect.bisect_right(self.starts, start) - 1
        base = self.starts[i]
        return self.data[i][start - base : end - base]


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
    # Every regular file walked, by inode number (hard links once): a read plan for them
    # needs no FIEMAP where the inode held the extents.
    files: dict[int, FileMap] = field(default_factory=dict)


def prefetch(image: str, partition_start: int, starts: list[tuple[int, Selection]]) -> Walked:
    """Walk from the directories `starts` (inode number, selection) in the ext2/3/4
    filesystem at `partition_start` of `image`, reading every directory block, inode,
    xattr block and long symlink the selection covers. Best effort: a filesystem this
    cannot read is left to the kernel's own reads."""
    walked = Walked()
    with ThreadPoolExecutor(THREADS) as pool:
        try:
            reader = ImageReader(image, pool)
        except OSError as exc:
            walked.errors.append(str(exc))
            return walked
        try:
            fs = Ext4(reader.read, partition_start)
            _walk(fs, reader, starts, walked)
        except (NotExt4, OSError, IndexError, ValueError, struct.error) as exc:
            log.info("metadata prefetch stopped: %s", exc)
            walked.errors.append(str(exc))
        finally:
            walked.bytes_read = reader.bytes_read
            reader.close()
    return walked


def _walk(fs: Ext4, reader: ImageReader, starts: list[tuple[int, Selection]], w: Walked) -> None:
    # inodes to read next: what to walk below each, and its path
    wanted: dict[int, tuple[Selection, bytes]] = {n: (sel, b"") for n, sel in starts}
    seen: set[int] = set()  # directories walked: a damaged tree may loop
    while wanted and w.rounds < MAX_LEVELS:
        w.rounds += 1
        chunks = reader.read_many(fs.inode_range(n) for n in wanted)
        inodes = [(fs.parse_inode(n, chunks.get(*fs.inode_range(n))), sel, rel)
                  for n, (sel, rel) in wanted.items()]  # fmt: skip
        w.inodes += len(inodes)
        dirs: list[tuple[Inode, list[Range], Selection, bytes]] = []
        extra: list[Range] = []  # read for the kernel's sake, not parsed
        for inode, sel, rel in inodes:
            if inode.xattr_block:
                at = fs.start + inode.xattr_block * fs.block_size
                extra.append((at, at + fs.block_size))
            if inode.is_dir and inode.number not in seen:
                seen.add(inode.number)
                dirs.append((inode, fs.data_ranges(inode), sel, rel))
            elif inode.is_symlink:
                extra += fs.data_ranges(inode)
            elif inode.is_file:
                w.files[inode.number] = FileMap(rel, inode.size, fs.inode_extents(inode))
        w.directories += len(dirs)
        chunks = reader.read_many([r for _, ranges, _, _ in dirs for r in ranges] + extra)
        wanted = {}
        for inode, ranges, sel, rel in dirs:
            data = b"".join(chunks.get(*r) for r in ranges)
            for entry in fs.entries(inode, data):
                if sel is None or entry.name in sel:
                    below = None if sel is None else sel[entry.name]
                    wanted[entry.inode] = (below, os.path.join(rel, entry.name))


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
