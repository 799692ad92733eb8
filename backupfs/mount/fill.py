"""Background fill: once a disk is read, stream the rest of it into the kernel's page cache
of its file (FUSE_NOTIFY_STORE), so the loop devices and filesystems on it read from
memory instead of paying a round trip per miss.

First the metadata of its ext2/3/4 filesystems, so browsing is served first: every
directory block and inode, in parallel rounds through the mount itself (fill_meta.py),
at background priority like everything the fill fetches; fill=metadata stops there.
Then, with fill=auto, the data: the data pass walks the served file in disk order
(inside an ext filesystem only the blocks its bitmaps mark in use), `FILL_PIECE` at a
time, `FILL_WORKERS` pieces at once. A piece whose every block is zeros (by the store's
digests, or unallocated in a virtual disk's tables) is skipped: no fetch, no page.
Fetches go at background priority, so a demand read takes the next free connection
before any fill request, and no new piece starts while demand reads wait for a
connection or a read plan (restore, warm) is being served: a plan knows better what is
needed. The bytes are the block reader's, verified like any other; a raw image's blocks
leave the LRU once the kernel holds them, so the fill never pushes out what demand
reads cached. The total pushed per mount is bounded (`fill_max=`); the kernel evicts
those pages like any clean page cache. At most FILLS_AT_ONCE disks fill at a time.
"""

import errno
import logging
from collections.abc import Callable, Iterator

import trio

from backupfs.errors import FetchError, FormatError
from backupfs.mount.fill_meta import Layout, layout, walk_metadata
from backupfs.ranges import Covered, block_range
from backupfs.readpath.vdisk import DiskReader
from backupfs.stats import Stats
from backupfs.store.image import Image, Served

log = logging.getLogger(__name__)
FILL_PIECE = 4 << 20
FILL_WORKERS = 4
FILLS_AT_ONCE = 2  # disks filled at the same time; the others wait their turn
BACKOFF_S = 0.02  # while demand reads wait for a connection

Store = Callable[[int, int, bytes], None]  # pyfuse3.notify_store(inode, offset, data)


class Filler:
    def __init__(
        self,
        disks: DiskReader,
        nursery: trio.Nursery,
        stats: Stats,
        max_bytes: int,
        store: Store,
        busy: Callable[[], bool],
        planning: Callable[[], bool],
        path_of: Callable[[int], str | None],
        data: bool = True,
    ) -> None:
        self.disks, self.nursery, self.stats = disks, nursery, stats
        self.left_bytes = max_bytes  # of the mount's budget
        self.store = store
        self.busy = busy  # demand reads wait for a connection, or a read plan is served
        self.planning = planning  # a read plan is served: the metadata walk gives way
        self.path_of = path_of  # of a file of the mount, for the metadata walk
        self.data = data  # fill=auto; False: fill=metadata
        self._started: set[int] = set()  # inodes
        # What the fill pushed into the page cache, per served disk (by identity: the
        # tree's objects live as long as the mount), so a read plan does not fetch it again.
        self._pushed: dict[int, Covered] = {}
        self._turns = trio.CapacityLimiter(FILLS_AT_ONCE)  # `file *.img` opens many disks

    def on_read(self, inode: int, served: Served) -> None:
        """A read of `served` (the file `inode`): start its fill, once per mount."""
        if inode in self._started or self.left_bytes <= 0:
            return
        self._started.add(inode)
        self.nursery.start_soon(self._fill, inode, served)

    def filled(self, served: Served, start: int, end: int) -> bool:
        """Whether the fill pushed all of `[start, end)` of `served` into the kernel's page
        cache. The kernel may have evicted some since (memory pressure): a read of those
        pages is then a miss like any other, fetched on demand."""
        pushed = self._pushed.get(id(served))
        return pushed is not None and pushed.covers(start, end)

    async def _fill(self, inode: int, served: Served) -> None:
        async with self._turns:
            self.stats.fills_started += 1
            await self._fill_disk(inode, served)
            self.stats.fills_done += 1

    async def _fill_disk(self, inode: int, served: Served) -> None:
        path = self.path_of(inode)
        found = Layout()
        if path is not None:
            found = await trio.to_thread.run_sync(layout, path, abandon_on_cancel=True)
        if path is not None and found.ext_starts:
            await self._walk(path, found.ext_starts)
        if not self.data:
            return
        ranges = found.ranges or [(0, served.size_bytes)]
        pieces = iter(_pieces(ranges, FILL_PIECE))
        log.info("filling the page cache of inode %d: %d bytes in %d ranges", inode,
                 sum(hi - lo for lo, hi in ranges), len(ranges))  # fmt: skip
        async with trio.open_nursery() as workers:
            for _ in range(FILL_WORKERS):
                workers.start_soon(self._worker, inode, served, pieces)

    async def _walk(self, path: str, starts: list[int]) -> None:
        """The metadata walk, through the mount from the daemon's own threads, so its
        misses are fetched at background priority (fuse_ops: `background_reads`). It stops
        for good at its next round once a read plan is served: a restore walks what it
        needs itself, and does not wait behind a walk of everything."""
        read = await trio.to_thread.run_sync(walk_metadata, path, starts, self.planning,
                                             abandon_on_cancel=True)  # fmt: skip
        self.stats.fill_metadata_bytes += read

    async def _worker(self, inode: int, served: Served, pieces: Iterator[tuple[int, int]]) -> None:
        for start, end in pieces:
            await self._after_demand()
            if self.left_bytes <= 0:
                return
            try:
                stored = await self.disks.stored_ranges(served, start, end)
                if not await _worth_filling(stored):
                    continue
                for image, lo, hi in stored:  # at background priority
                    self.disks.reader.fetch_behind(image, lo, hi)
                data = await self.disks.read(served, start, end - start, counted=False)
                # In a thread: the kernel may hold a page of this range locked for a read
                # that waits for this very loop to answer it (the store would deadlock).
                await trio.to_thread.run_sync(self.store, inode, start, data,
                                              abandon_on_cancel=True)  # fmt: skip
            except (FetchError, FormatError) as exc:
                log.info("fill of inode %d stopped at %d: %s", inode, start, exc)
                return
            except OSError as exc:  # the kernel forgot the inode, or has no notify_store
                if exc.errno not in (errno.ENOENT, errno.ENOSYS):
                    log.warning("fill of inode %d stopped: %s", inode, exc)
                return
            self._pushed.setdefault(id(served), Covered()).add(start, start + len(data))
            self.left_bytes -= len(data)
            self.stats.fill_bytes += len(data)
            self._release(served, start, end)

    async def _after_demand(self) -> None:
        """Return once no demand read waits for a connection and no plan is served."""
        while True:
            if not self.busy():
                return
            await trio.sleep(BACKOFF_S)

    def _release(self, served: Served, start: int, end: int) -> None:
        """A raw image's blocks leave the LRU once the kernel holds them."""
        if isinstance(served, Image):
            cache = self.disks.reader.cache
            for n in block_range(start, end - start, served.block_size, served.size_bytes):
                cache.discard((served.image_id, n))


async def _worth_filling(stored: list[tuple[Image, int, int]]) -> bool:
    """Whether the stored ranges of a piece hold any block that is not all zeros."""
    for image, lo, hi in stored:
        digests = image.digests
        if digests is None or not digests.marks_zeros:
            return True
        bs = image.digest_block_size
        records = await digests.records(lo // bs, -(-hi // bs))
        if records.strip(b"\0"):
            return True
    return False


def _pieces(ranges: list[tuple[int, int]], step: int) -> Iterator[tuple[int, int]]:
    for lo, hi in ranges:
        for start in range(lo, hi, step):
            yield start, min(start + step, hi)


def fill_budget() -> int:
    """fill_max=0: a quarter of the machine's memory (MemTotal)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30
