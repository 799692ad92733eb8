"""A byte-bounded LRU cache of verified blocks. Plain data structure: no trio, no I/O."""

from collections.abc import Hashable

from cachetools import LRUCache

from backupfs.stats import Stats

BlockKey = tuple[int, int]  # (image_id, block_no): what the read path caches and fetches


class BlockCache:
    def __init__(self, max_bytes: int, stats: Stats) -> None:
        self._lru: LRUCache[Hashable, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self.stats = stats

    def get(self, key: Hashable) -> bytes | None:
        block = self._lru.get(key)
        if block is None:
            self.stats.cache_misses += 1
        else:
            self.stats.cache_hits += 1
        return block

    def peek(self, key: Hashable) -> bytes | None:
        """The block, without counting a hit or a miss (the read already counted it)."""
        return self._lru.get(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru

    def discard(self, key: Hashable) -> None:
        self._lru.pop(key, None)

    def put(self, key: Hashable, block: bytes) -> None:
        if len(block) <= self._lru.maxsize:
            self._lru[key] = block

    @property
    def bytes_used(self) -> int:
        return int(self._lru.currsize)

    def __len__(self) -> int:
        return len(self._lru)
