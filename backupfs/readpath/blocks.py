"""The read path: cached blocks, one in-flight fetch per block, readahead, read plans.

All on one trio thread. Between two awaits the cache and `_pending` are consistent: a
block is cached, pending, or neither, and only `_start_fetches` (which does not await)
makes it pending. A fetch task runs in the daemon's nursery, not in the reading FUSE task,
so an interrupted reader cannot cancel a fetch others wait on; every waiter sees the same
outcome. The state, who moves a block between states, and what to check before adding an
`await` here are written down in docs/readpath.md.
"""

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import trio

from backupfs.errors import FetchError
from backupfs.options import MountOptions
from backupfs.ranges import block_range, block_span, contiguous_runs, slice_blocks
from backupfs.readpath.cache import BlockCache, BlockKey
from backupfs.readpath.plans import PlanBook, PlanCursor
from backupfs.readpath.readahead import StreamTracker
from backupfs.readpath.source import RangeSource
from backupfs.readpath.throughput import Throughput
from backupfs.stats import Stats
from backupfs.store.image import Image

log = logging.getLogger(__name__)
# A sequential stream reads ahead at most what the source delivered in this many seconds
# lately (and never more than readahead=): a slow link is not asked for bytes a reader
# will need only a minute from now, or never if it stops.
READAHEAD_AHEAD_S = 1.0
FAILED_MAX_BLOCKS = 1 << 16  # failed block keys remembered at most
# Reads made in this context fetch what they miss at background priority: nobody waits
# for them but the daemon itself (the background fill's metadata walk, which reads
# through the mount from the daemon's own threads).
_BACKGROUND: ContextVar[bool] = ContextVar("background_reads", default=False)


@contextlib.contextmanager
def background_reads(background: bool = True) -> Iterator[None]:
    """Within: reads fetch at background priority (demand reads take connections first)."""
    token = _BACKGROUND.set(background)
    try:
        yield
    finally:
        _BACKGROUND.reset(token)


@dataclass(frozen=True)
class ReaderConfig:
    """What the block reader needs of the mount options."""

    request_size: int = 4 << 20  # largest single fetch, in bytes (mount option request_size=)
    hinted_blocks: int = 1 << 16  # warmed/planned block keys remembered (not a mount option)
    read_deadline_s: float = 176.0  # a read returns data or EIO within this (from_options)
    failed_ttl_s: float = 5.0  # a block whose own fetch failed for good fails at once this long

    @classmethod
    def from_options(cls, opts: MountOptions) -> "ReaderConfig":
        # Every attempt may wait `timeout` for a byte, retries back off at most 4 s each: a
        # read that waited this long will not get its data from this fetch chain.
        deadline = (opts.retries + 1) * opts.timeout + 4.0 * opts.retries + 10.0
        return cls(request_size=opts.request_size, read_deadline_s=deadline)


class _Pending:
    __slots__ = ("done", "block", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.block: bytes | None = None
        self.error: Exception | None = None


class BlockReader:
    def __init__(
        self,
        source: RangeSource,
        cache: BlockCache,
        nursery: trio.Nursery,
        config: ReaderConfig,
        stats: Stats,
    ) -> None:
        self.source = source  # verified blocks: the HTTP store, maybe behind the disk cache
        self.cache = cache
        self.nursery = nursery  # the daemon's: fetch tasks outlive the reads that start them
        self.config = config
        self.stats = stats
        self._pending: dict[BlockKey, _Pending] = {}
        self.plans = PlanBook(config.hinted_blocks)
        self.throughput = Throughput()  # what the source delivers: sizes readahead windows
        # Blocks whose fetch failed for good lately: block key -> (until when, the error).
        self._failed: dict[BlockKey, tuple[float, Exception]] = {}

    @property
    def request_size(self) -> int:
        """The largest single fetch: read plans are cut into ranges of at most this."""
        return self.config.request_size

    async def read(
        self,
        image: Image,
        offset: int,
        size: int,
        tracker: StreamTracker | None = None,
        counted: bool = True,
    ) -> bytes:
        """Exactly `size` bytes at `offset`, fewer only at end of file; raises FetchError.
        `tracker`: the stream the read belongs to, for readahead (None: no readahead).
        `counted`: served to a reader as they are (False: a virtual disk's table or piece,
        which counts what it serves itself)."""
        needed = block_range(offset, size, image.block_size, image.size_bytes)
        if not needed:
            return b""
        cached = [self.cache.get((image.image_id, n)) for n in needed]
        missing = [n for n, b in zip(needed, cached, strict=True) if b is None]
        self._start_fetches(image, missing, urgent=not _BACKGROUND.get())
        if tracker is not None:
            self._read_ahead(image, offset, size, needed, tracker)  # queued after the demand
        with trio.move_on_after(self.config.read_deadline_s):
            blocks = await self._collect(image, needed, cached)
            data = slice_blocks(blocks, needed[0], image.block_size, offset, size)
            self._served(image, offset, offset + len(data), counted)
            return data
        raise FetchError(f"no data within {self.config.read_deadline_s:g}s", transient=True)

    def prefetch(self, image: Image, start: int, end: int) -> None:
        """Fetch `[start, end)` into the cache for `backupfs warm`."""
        block_nos = block_range(start, end - start, image.block_size, image.size_bytes)
        self.plans.hint(image, block_nos)
        self._start_fetches(image, block_nos)

    def fetch_behind(self, image: Image, start: int, end: int) -> None:
        """Start fetching `[start, end)` at background priority, as a hint to nobody (the
        background fill: its blocks say nothing about what readers will read)."""
        self._start_fetches(image, block_range(start, end - start, image.block_size,
                                               image.size_bytes))  # fmt: skip

    def plan(self, image: Image, start: int, end: int, cursor: PlanCursor, position: int) -> None:
        """Prefetch `[start, end)`, which ends at `position` of the plan read by `cursor`'s
        readers; see `PlanBook.consume`."""
        self.plans.add(image, start, end, cursor, position)
        self.stats.plan_bytes += end - start
        block_nos = block_range(start, end - start, image.block_size, image.size_bytes)
        self._start_fetches(image, block_nos)

    def readahead_limit(self) -> int | None:
        """The most a readahead window may hold: what the source delivered in the last
        READAHEAD_AHEAD_S (None: nothing measured yet)."""
        rate = self.throughput.rate(trio.current_time())
        return None if rate is None else int(rate * READAHEAD_AHEAD_S)

    def forget_plan(self, cursor: PlanCursor) -> None:
        """A plan ended (its client went away): its blocks age out of the cache normally."""
        self.plans.forget(cursor)

    async def fetched(self, image: Image, start: int, end: int) -> None:
        """Return once `[start, end)` is in the cache (fetching what is not); FetchError."""
        for n in block_range(start, end - start, image.block_size, image.size_bytes):
            await self._wait(image, n)

    def _read_ahead(
        self, image: Image, offset: int, size: int, needed: range, tracker: StreamTracker
    ) -> None:
        """Feed the read to its stream tracker and start the fetches it asks for. Reads of
        planned or warmed blocks say nothing about what comes next: they feed nothing."""
        if self.plans.active and self.plans.covers(image, needed):
            return
        ahead = tracker.on_read(offset, size, self.readahead_limit())
        if ahead is not None:
            start, end = ahead
            bs = image.block_size
            self._start_fetches(image, block_range(start, end - start, bs, image.size_bytes))

    async def _collect(
        self, image: Image, needed: range, cached: list[bytes | None]
    ) -> list[bytes]:
        """The blocks `needed`: those `cached` when the read began, the others as their
        fetches deliver them (in order; the first failure raises)."""
        return [
            block if block is not None else await self._wait(image, n)
            for n, block in zip(needed, cached, strict=True)
        ]

    def _served(self, image: Image, start: int, end: int, counted: bool = True) -> None:
        """Count `[start, end)` as served; a block whose planned bytes were all served now
        leaves the cache (the kernel's page cache has them)."""
        if counted:
            self.stats.bytes_served += end - start
        if self.plans.active:
            for key in self.plans.consume(image, start, end):
                self.cache.discard(key)

    def _start_fetches(
        self, image: Image, block_nos: range | list[int], urgent: bool = False
    ) -> None:
        """Make every block of `block_nos` that is neither cached, pending nor recently
        failed pending, and start a fetch task per run of at most `request_size`; `urgent`
        when a reader waits for them. Never awaits."""
        now = trio.current_time() if self._failed else 0.0
        todo = [
            n
            for n in block_nos
            if (key := (image.image_id, n)) not in self._pending
            and key not in self.cache
            and (not self._failed or self._failed_recently(key, now) is None)
        ]
        max_blocks = max(1, self.config.request_size // image.block_size)
        for first, end in contiguous_runs(todo, max_blocks):
            for n in range(first, end):
                self._pending[(image.image_id, n)] = _Pending()
            self.nursery.start_soon(self._fetch_run, image, first, end, urgent)

    def _failed_recently(self, key: BlockKey, now: float) -> Exception | None:
        """The error of the block's last fetch if it failed for good less than
        `failed_ttl_s` ago: the kernel retries a failed readahead page by page, and each
        page would otherwise start a whole new chain of attempts."""
        failed = self._failed.get(key)
        if failed is None:
            return None
        if failed[0] <= now:
            del self._failed[key]
            return None
        return failed[1]

    def _remember_failure(self, keys: list[BlockKey], error: Exception) -> None:
        expires = trio.current_time() + self.config.failed_ttl_s
        for key in keys:
            self._failed.pop(key, None)
            self._failed[key] = (expires, error)
        while len(self._failed) > FAILED_MAX_BLOCKS:  # oldest first: insertion order
            del self._failed[next(iter(self._failed))]

    async def _wait(self, image: Image, block_no: int) -> bytes:
        key = (image.image_id, block_no)
        pending = self._pending.get(key)
        if pending is None:  # fetched since read() counted its miss, or never started
            block = self.cache.peek(key)
            if block is not None:
                return block
            failed = self._failed_recently(key, trio.current_time())
            if failed is not None:
                raise failed
            self._start_fetches(image, [block_no], urgent=not _BACKGROUND.get())
            pending = self._pending[key]
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.block is not None
        return pending.block

    async def _fetch_run(self, image: Image, first: int, end: int, urgent: bool = False) -> None:
        """The fetch task of blocks `[first, end)`: cache them and wake their waiters, or
        hand every waiter the same exception. Runs in the daemon's nursery."""
        keys = [(image.image_id, n) for n in range(first, end)]
        error: Exception = FetchError("fetch cancelled", transient=False)
        try:
            start = block_span(first, image.block_size, image.size_bytes)[0]
            stop = block_span(end - 1, image.block_size, image.size_bytes)[1]
            began = trio.current_time()
            blocks = await self.source.fetch_range(image, start, stop, image.block_size, urgent)
            self.throughput.record(began, trio.current_time(), stop - start)
            for key, block in zip(keys, blocks, strict=True):
                self.cache.put(key, block)
                pending = self._pending.pop(key)
                pending.block = block
                pending.done.set()
        except Exception as exc:
            log.warning("read of %s blocks [%d,%d) failed: %s", image.url, first, end, exc)
            self.stats.read_errors += 1
            error = exc
            if len(keys) == 1:
                # A run of several blocks may fail for one bad block among good ones: its
                # readers retry page by page, each page fetching its own block, and only a
                # block that fails on its own is given up on for a while.
                self._remember_failure(keys, exc)
        finally:
            for key in keys:
                left = self._pending.pop(key, None)
                if left is not None:
                    left.error = error
                    left.done.set()
