"""The block digests of an opened image, as the read path asks for them.

`LoadedDigests`: a store format 1 digest file, fetched whole and checked against the
catalogue when the disk is opened (at most MAX_METADATA_BYTES: 2 TiB at 64 KiB blocks).

`ChunkedDigests`: format 2 (store/digestfile.py). Only the chunk index is fetched at open
(32 bytes per 2048 records: 1 MiB for 4 TiB at 64 KiB blocks); each chunk of records is
fetched by range when a read first needs it, checked against the index, retried like a
data block when it does not match, and kept in one `ChunkCache` for all images, bounded
in bytes (its share of cache_size=). A chunk the index says is all zero records (a region
of holes) is never fetched.
"""

import hashlib
import logging
from collections.abc import Hashable

import trio
from cachetools import LRUCache

from backupfs.errors import FetchError
from backupfs.remote.client import StoreClient, redact
from backupfs.stats import Stats
from backupfs.store.digestfile import CHUNK_BYTES, DIGEST_SIZE, chunk_span, zero_chunk_hash

log = logging.getLogger(__name__)


class LoadedDigests:
    """Every record of a format 1 digest file, verified as a whole."""

    marks_zeros = False

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def records(self, first: int, stop: int) -> bytes:
        return self.data[first * DIGEST_SIZE : stop * DIGEST_SIZE]


class ChunkedDigests:
    """The records of a format 2 digest file, fetched chunk by chunk through a ChunkCache."""

    marks_zeros = True

    def __init__(
        self, image_id: int, path: str, index: bytes, digest_size: int, cache: "ChunkCache"
    ) -> None:
        self.image_id = image_id
        self.path = path  # of the digest file, relative to the store
        self.index = index  # SHA-256 of each chunk, verified against the catalogue
        self.digest_size = digest_size  # bytes of the digest file
        self.cache = cache

    def chunk_hash(self, chunk: int) -> bytes:
        return self.index[chunk * DIGEST_SIZE : (chunk + 1) * DIGEST_SIZE]

    async def records(self, first: int, stop: int) -> bytes:
        lo, hi = first * DIGEST_SIZE, stop * DIGEST_SIZE
        if not 0 <= lo <= hi <= self.digest_size:
            raise FetchError(f"records [{first},{stop}) are past the digest file", transient=False)
        parts = []
        for chunk in range(lo // CHUNK_BYTES, -(-hi // CHUNK_BYTES)):
            data = await self.cache.get(self, chunk)
            base = chunk * CHUNK_BYTES
            parts.append(data[max(lo, base) - base : min(hi, base + CHUNK_BYTES) - base])
        return parts[0] if len(parts) == 1 else b"".join(parts)


class ChunkCache:
    """Verified digest chunks of every opened image, least recently used out, at most
    `max_bytes`; concurrent readers of one chunk wait for the same fetch."""

    def __init__(self, store: StoreClient, max_bytes: int, stats: Stats) -> None:
        self.store = store
        self.stats = stats
        self._lru: LRUCache[Hashable, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self._loading: dict[Hashable, trio.Event] = {}
        self._zeros: dict[int, tuple[bytes, bytes]] = {}  # length -> (hash, chunk)

    @property
    def bytes_used(self) -> int:
        return int(self._lru.currsize)

    def _zero_chunk(self, length: int) -> tuple[bytes, bytes]:
        if length not in self._zeros:
            self._zeros[length] = (zero_chunk_hash(length), bytes(length))
        return self._zeros[length]

    async def get(self, table: ChunkedDigests, chunk: int) -> bytes:
        start, end = chunk_span(chunk, table.digest_size)
        zero_hash, zeros = self._zero_chunk(end - start)
        if table.chunk_hash(chunk) == zero_hash:
            return zeros  # holes only: nothing to fetch
        key = (table.image_id, chunk)
        while (found := self._lru.get(key)) is None:
            loading = self._loading.get(key)
            if loading is None:
                return await self._load(table, chunk, key, start, end)
            await loading.wait()  # then look again: the fetch may have failed
        return found

    async def _load(
        self, table: ChunkedDigests, chunk: int, key: Hashable, start: int, end: int
    ) -> bytes:
        done = self._loading[key] = trio.Event()
        try:
            data = await self._fetch(table, chunk, start, end)
            if len(data) <= self._lru.maxsize:
                self._lru[key] = data
            self.stats.digest_cache_bytes = self.bytes_used
            return data
        finally:
            del self._loading[key]
            done.set()

    async def _fetch(self, table: ChunkedDigests, chunk: int, start: int, end: int) -> bytes:
        """The chunk's bytes, fetched again when they do not match the index."""

        async def attempt() -> bytes:
            data = await self.store.get_part(table.path, start, end, table.digest_size)
            self.stats.digest_bytes_fetched += len(data)
            if hashlib.sha256(data).digest() != table.chunk_hash(chunk):
                self.stats.verify_failures += 1
                raise FetchError(f"digest chunk {chunk} does not match its index", transient=True)
            return data

        return await self.store.with_retries(attempt, redact(self.store.url(table.path)))
