"""The read path: cached blocks, one in-flight fetch per block, readahead.

Concurrency model (all on one trio thread): `_pending` maps a block key to the fetch
that will deliver it. A fetch task runs in the daemon's nursery, not in the reading
FUSE task, so an interrupted reader cannot cancel a fetch others wait on. Between two
awaits the cache and `_pending` are consistent: a block is either cached, pending, or
neither, and only `_start_fetches` moves it to pending.
"""

import logging

import trio
from cachetools import LRUCache

from backupfs.errors import FetchError
from backupfs.ranges import block_range, block_span, contiguous_runs, slice_blocks
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.diskcache import DiskCache
from backupfs.readpath.readahead import StreamTracker
from backupfs.readpath.source import RangeSource
from backupfs.stats import Stats
from backupfs.store.image import Image

log = logging.getLogger(__name__)
BlockKey = tuple[int, int]


class _Pending:
    __slots__ = ("done", "block", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.block: bytes | None = None
        self.error: Exception | None = None


class PlanCursor:
    """How far the readers of one read plan got: the plan position (bytes of the plan up
    to the end of a range) of the furthest planned block served so far."""

    def __init__(self) -> None:
        self.position = 0
        self.moved = trio.Event()  # replaced each time the position advances

    def advance(self, position: int) -> None:
        if position > self.position:
            self.position = position
            self.moved.set()
            self.moved = trio.Event()


class _Planned:
    __slots__ = ("left", "cursor", "position")

    def __init__(self, left: int, cursor: PlanCursor, position: int) -> None:
        self.left = left  # planned bytes of the block not served yet
        self.cursor = cursor
        self.position = position


class BlockReader:
    def __init__(
        self,
        store: RangeSource,
        cache: BlockCache,
        nursery: trio.Nursery,
        request_size: int,
        stats: Stats,
        hinted_blocks: int = 1 << 16,
        disk: DiskCache | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.nursery = nursery
        self.request_size = request_size
        self.stats = stats
        self._pending: dict[BlockKey, _Pending] = {}
        self.disk = disk  # verified blocks on local disk, keyed by content digest
        # Read plans: bytes of each planned block not yet served. A block is dropped from
        # the cache once all its planned bytes were read (the kernel's page cache has them).
        self._planned: dict[BlockKey, _Planned] = {}
        # Blocks a plan or `warm` asked for: reading them says nothing about what comes
        # next, so it does not drive readahead. Bounded like a cache, as a set of keys.
        self._hinted: LRUCache[BlockKey, None] = LRUCache(maxsize=hinted_blocks)

    async def read(self, image: Image, offset: int, size: int, tracker: StreamTracker) -> bytes:
        """Exactly `size` bytes at `offset`, fewer only at end of file; raises FetchError."""
        bs = image.block_size
        needed = block_range(offset, size, bs, image.size_bytes)
        if not needed:
            return b""
        blocks = [self.cache.get((image.image_id, n)) for n in needed]
        self._start_fetches(image, [n for n, b in zip(needed, blocks, strict=True) if b is None])
        hinted = (self._planned or self._hinted) and all(
            (image.image_id, n) in self._planned or (image.image_id, n) in self._hinted
            for n in needed
        )
        ahead = None if hinted else tracker.on_read(offset, size)
        if ahead is not None:
            start, end = ahead
            self._start_fetches(image, block_range(start, end - start, bs, image.size_bytes))
        for i, block_no in enumerate(needed):
            if blocks[i] is None:
                blocks[i] = await self._wait(image, block_no)
        data = slice_blocks(blocks, needed[0], bs, offset, size)  # type: ignore[arg-type]
        self.stats.bytes_served += len(data)
        if self._planned:
            self._consume_planned(image, offset, offset + len(data))
        return data

    def prefetch(self, image: Image, start: int, end: int) -> None:
        """Fetch `[start, end)` into the cache for `backupfs warm`."""
        block_nos = block_range(start, end - start, image.block_size, image.size_bytes)
        for n in block_nos:
            self._hinted[(image.image_id, n)] = None
        self._start_fetches(image, block_nos)

    def plan(self, image: Image, start: int, end: int, cursor: PlanCursor, position: int) -> None:
        """Prefetch `[start, end)`, which ends at `position` of the plan read by `cursor`'s
        readers; see `_consume_planned`."""
        bs = image.block_size
        block_nos = block_range(start, end - start, bs, image.size_bytes)
        for n in block_nos:
            lo, hi = block_span(n, bs, image.size_bytes)
            key = (image.image_id, n)
            planned = self._planned.get(key)
            if planned is None:
                self._planned[key] = _Planned(min(end, hi) - max(start, lo), cursor, position)
            else:
                planned.left += min(end, hi) - max(start, lo)
        self.stats.plan_bytes += end - start
        self._start_fetches(image, block_nos)

    def _consume_planned(self, image: Image, start: int, end: int) -> None:
        """Serving planned bytes moves their plan's cursor; a block whose planned bytes
        were all served leaves the cache (the kernel's page cache has them now)."""
        bs = image.block_size
        for n in block_range(start, end - start, bs, image.size_bytes):
            key = (image.image_id, n)
            planned = self._planned.get(key)
            if planned is None:
                continue
            planned.cursor.advance(planned.position)
            lo, hi = block_span(n, bs, image.size_bytes)
            planned.left -= min(end, hi) - max(start, lo)
            if planned.left <= 0:
                del self._planned[key]
                self.cache.discard(key)

    def forget_plan(self, cursor: PlanCursor) -> None:
        """A plan ended (its client went away): its blocks age out of the cache normally."""
        for key in [k for k, p in self._planned.items() if p.cursor is cursor]:
            del self._planned[key]

    async def fetched(self, image: Image, start: int, end: int) -> None:
        """Return once `[start, end)` is in the cache (fetching what is not); FetchError."""
        for n in block_range(start, end - start, image.block_size, image.size_bytes):
            await self._wait(image, n)

    def _start_fetches(self, image: Image, block_nos: range | list[int]) -> None:
        todo = [
            n
            for n in block_nos
            if (image.image_id, n) not in self._pending and (image.image_id, n) not in self.cache
        ]
        max_blocks = max(1, self.request_size // image.block_size)
        for first, end in contiguous_runs(todo, max_blocks):
            for n in range(first, end):
                self._pending[(image.image_id, n)] = _Pending()
            self.nursery.start_soon(self._fetch_run, image, first, end)

    async def _wait(self, image: Image, block_no: int) -> bytes:
        key = (image.image_id, block_no)
        pending = self._pending.get(key)
        if pending is None:  # fetched since read() counted its miss, or never started
            block = self.cache.peek(key)
            if block is not None:
                return block
            self._start_fetches(image, [block_no])
            pending = self._pending[key]
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.block is not None
        return pending.block

    async def _fetch_run(self, image: Image, first: int, end: int) -> None:
        keys = [(image.image_id, n) for n in range(first, end)]
        error: Exception = FetchError("fetch cancelled", transient=False)
        try:
            blocks = await self._load(image, first, end)
            for key, block in zip(keys, blocks, strict=True):
                self.cache.put(key, block)
                pending = self._pending.pop(key)
                pending.block = block
                pending.done.set()
        except Exception as exc:
            log.warning("read of %s blocks [%d,%d) failed: %s", image.url, first, end, exc)
            self.stats.read_errors += 1
            error = exc
        finally:
            for key in keys:
                left = self._pending.pop(key, None)
                if left is not None:
                    left.error = error
                    left.done.set()

    async def _load(self, image: Image, first: int, end: int) -> list[bytes]:
        """Blocks `[first, end)`: from the disk cache where it has them, else over HTTP."""
        bs = image.block_size
        found: list[bytes | None] = [None] * (end - first)
        parts = self._digest_parts(image)
        if self.disk is not None and parts:
            found = await trio.to_thread.run_sync(self._from_disk, image, first, end, parts)
            self.stats.disk_cache_hits += sum(b is not None for b in found)
        fresh: list[tuple[int, list[bytes]]] = []
        missing = [n for n, b in zip(range(first, end), found, strict=True) if b is None]
        for run_first, run_end in contiguous_runs(missing, end - first):
            start = block_span(run_first, bs, image.size_bytes)[0]
            stop = block_span(run_end - 1, bs, image.size_bytes)[1]
            blocks = await self.store.fetch_range(image, start, stop, bs)
            found[run_first - first : run_end - first] = blocks
            fresh.append((run_first, blocks))
        if fresh and self.disk is not None and parts:
            self.nursery.start_soon(trio.to_thread.run_sync, self._to_disk, image, fresh, parts)
        return found  # type: ignore[return-value]

    @staticmethod
    def _digest_parts(image: Image) -> int:
        """Digest blocks per cache block; 0 when blocks cannot be keyed by content."""
        if image.digests is None or image.block_size % image.digest_block_size:
            return 0
        return image.block_size // image.digest_block_size

    def _from_disk(self, image: Image, first: int, end: int, parts: int) -> list[bytes | None]:
        assert self.disk is not None and image.digests is not None
        out: list[bytes | None] = []
        for n in range(first, end):
            digests = image.digests[n * parts : (n + 1) * parts]
            pieces = []
            for digest in digests:
                piece = self.disk.get(digest)
                if piece is None:
                    break
                pieces.append(piece)
            out.append(b"".join(pieces) if len(pieces) == len(digests) else None)
        return out

    def _to_disk(self, image: Image, fresh: list[tuple[int, list[bytes]]], parts: int) -> None:
        assert self.disk is not None and image.digests is not None
        dbs = image.digest_block_size
        for run_first, blocks in fresh:
            for i, block in enumerate(blocks):
                base = (run_first + i) * parts
                for j in range(0, len(block), dbs):
                    self.disk.put(image.digests[base + j // dbs], block[j : j + dbs])
