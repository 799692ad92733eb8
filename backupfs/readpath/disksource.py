"""A RangeSource that serves blocks from the persistent disk cache where it has them.

`DiskCachedSource` wraps another RangeSource (the HTTP `StoreClient`) and a `DiskCache`.
A fetch asks the disk cache, in a worker thread, for each block by the store's SHA-256
digests of its pieces (every hit is hashed again there), fetches the contiguous runs of
blocks it did not find from the inner source one after the other, and returns all of them.
Only then are the fresh blocks written to disk, by a worker thread started in the nursery
the source was given (the daemon's): the readers waiting for the fetch do not wait for the
disk, and a reader that goes away cannot cancel the write.

Blocks cannot be keyed by content when the image has no digests or the block size is not
a multiple of the digest block size; such fetches go straight to the inner source.

Worker threads touch only the DiskCache (thread-safe, blocking), the digests fetched for
them and `bytes` (immutable); never the stats, the nursery or the image itself. Zero
records (store format 2: a block of zeros) are never stored or looked up.
"""

import logging
from typing import cast

import trio

from backupfs.ranges import contiguous_runs
from backupfs.readpath.diskcache import DiskCache
from backupfs.readpath.source import RangeSource
from backupfs.stats import Stats
from backupfs.store.digestfile import DIGEST_SIZE, ZERO_RECORD
from backupfs.store.image import Image

log = logging.getLogger(__name__)
Fresh = list[tuple[int, list[bytes]]]  # (first block_no, blocks) of each run fetched
WRITE_BACKLOG_BYTES = 64 << 20  # fresh blocks waiting for the disk, at most


class DiskCachedSource:
    def __init__(
        self, inner: RangeSource, disk: DiskCache, nursery: trio.Nursery, stats: Stats
    ) -> None:
        self.inner = inner
        self.disk = disk
        self.nursery = nursery  # owns the disk writes; outlives every fetch
        self.stats = stats
        # Worker threads of their own: disk writes never wait behind block verification.
        self._reader = trio.CapacityLimiter(4)
        self._writer = trio.CapacityLimiter(1)
        self.backlog_bytes = 0  # fresh blocks waiting to be written

    async def fetch_range(
        self, image: Image, start: int, end: int, block_size: int, urgent: bool = False
    ) -> list[bytes]:
        """Bytes `[start, end)` cut into `block_size` blocks: from disk where it holds
        them, else from the inner source; raises FetchError like the inner source."""
        parts = _digest_parts(image, block_size)
        whole_blocks = start % block_size == 0 and (
            end % block_size == 0 or end == image.size_bytes
        )
        if not parts or not whole_blocks or end <= start:
            return await self.inner.fetch_range(image, start, end, block_size, urgent)
        assert image.digests is not None  # else parts == 0
        first, stop = start // block_size, -(-end // block_size)
        dbs = image.digest_block_size
        records = await image.digests.records(first * parts, -(-end // dbs))
        digests = [records[i : i + DIGEST_SIZE] for i in range(0, len(records), DIGEST_SIZE)]
        found = await trio.to_thread.run_sync(
            self._read, digests, first, stop, parts, limiter=self._reader
        )
        self.stats.disk_cache_hits += sum(b is not None for b in found)
        fresh: Fresh = []
        missing = [n for n, b in zip(range(first, stop), found, strict=True) if b is None]
        for run_first, run_end in contiguous_runs(missing, stop - first):
            run_start, run_stop = run_first * block_size, min(run_end * block_size, end)
            blocks = await self.inner.fetch_range(image, run_start, run_stop, block_size, urgent)
            found[run_first - first : run_end - first] = blocks
            fresh.append((run_first, blocks))
        if fresh:
            self._write_behind(digests, first, fresh, parts, dbs)
        return cast(list[bytes], found)  # every None was replaced by a fetched block

    def _read(self, digests: list[bytes], first: int, stop: int, parts: int) -> list[bytes | None]:
        """Worker thread: blocks `[first, stop)` from disk; None where a piece is missing.
        `digests` are those of the digest blocks from block `first` on."""
        out: list[bytes | None] = []
        for n in range(first, stop):
            wanted = digests[(n - first) * parts : (n - first + 1) * parts]
            if ZERO_RECORD in wanted:  # zeros are never stored: the inner source makes them
                out.append(None)
                continue
            pieces = []
            for digest in wanted:
                piece = self.disk.get(digest)
                if piece is None:
                    break
                pieces.append(piece)
            out.append(b"".join(pieces) if len(pieces) == len(wanted) else None)
        return out

    def _write_behind(
        self, digests: list[bytes], first: int, fresh: Fresh, parts: int, dbs: int
    ) -> None:
        """Queue the fresh blocks for writing; dropped (and counted) when the backlog is
        full: the disk cache may cost speed, never memory or the mount."""
        size = sum(len(b) for _, blocks in fresh for b in blocks)
        if self.backlog_bytes + size > WRITE_BACKLOG_BYTES:
            self.stats.disk_cache_writes_dropped += 1
            return
        self.backlog_bytes += size
        self.nursery.start_soon(self._write_task, digests, first, fresh, parts, dbs, size)

    async def _write_task(
        self, digests: list[bytes], first: int, fresh: Fresh, parts: int, dbs: int, size: int
    ) -> None:
        try:
            # Shielded: at unmount the backlog (at most WRITE_BACKLOG_BYTES) is still
            # written, so what this mount fetched is there for the next one.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(
                    self._write, digests, first, fresh, parts, dbs, limiter=self._writer
                )
        except Exception:  # never into the daemon's nursery
            log.warning("disk cache write failed", exc_info=True)
        finally:
            self.backlog_bytes -= size

    def _write(self, digests: list[bytes], first: int, fresh: Fresh, parts: int, dbs: int) -> None:
        """Worker thread: store each digest block of the fresh blocks under its digest."""
        for run_first, blocks in fresh:
            for i, block in enumerate(blocks):
                base = (run_first - first + i) * parts
                for j in range(0, len(block), dbs):
                    digest = digests[base + j // dbs]
                    if digest != ZERO_RECORD:
                        self.disk.put(digest, block[j : j + dbs])


def _digest_parts(image: Image, block_size: int) -> int:
    """Digest blocks per block of `block_size`; 0 when blocks cannot be keyed by content."""
    if image.digests is None or block_size % image.digest_block_size:
        return 0
    return block_size // image.digest_block_size
