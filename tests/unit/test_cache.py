"""The byte-bounded LRU block cache of backupfs.readpath.cache."""

from hypothesis import given
from hypothesis import strategies as st

from backupfs.readpath.cache import BlockCache
from backupfs.stats import Stats


def test_get_and_put_count_hits_and_misses() -> None:
    stats = Stats()
    cache = BlockCache(10_000, stats)
    assert cache.get((1, 0)) is None
    assert (stats.cache_hits, stats.cache_misses) == (0, 1)
    cache.put((1, 0), b"a" * 100)
    assert cache.get((1, 0)) == b"a" * 100
    assert cache.get((1, 0)) == b"a" * 100
    assert cache.get((2, 0)) is None  # same block number, other image
    assert (stats.cache_hits, stats.cache_misses) == (2, 2)
    assert (1, 0) in cache and (2, 0) not in cache
    assert (stats.cache_hits, stats.cache_misses) == (2, 2)  # `in` counts nothing
    assert len(cache) == 1
    assert cache.bytes_used == 100


def test_byte_bound_evicts_least_recently_used() -> None:
    cache = BlockCache(3000, Stats())
    for n in range(3):
        cache.put((1, n), bytes([n]) * 1000)
    assert cache.bytes_used == 3000
    assert cache.get((1, 0)) is not None  # block 0 is now the most recently used
    cache.put((1, 3), b"x" * 1000)
    assert (1, 1) not in cache  # the least recently used one went
    assert (1, 0) in cache and (1, 2) in cache and (1, 3) in cache
    assert cache.bytes_used == 3000
    cache.put((1, 4), b"y" * 2000)  # needs two blocks' room
    assert (1, 2) not in cache and (1, 0) not in cache
    assert (1, 3) in cache and (1, 4) in cache
    assert cache.bytes_used == 3000


def test_contains_does_not_refresh() -> None:
    cache = BlockCache(2000, Stats())
    cache.put("a", b"1" * 1000)
    cache.put("b", b"2" * 1000)
    assert "a" in cache
    cache.put("c", b"3" * 1000)
    assert "a" not in cache and "b" in cache


def test_block_larger_than_the_cache_is_not_kept() -> None:
    cache = BlockCache(1000, Stats())
    cache.put("small", b"s" * 10)
    cache.put("big", b"b" * 1001)
    assert "big" not in cache
    assert "small" in cache
    assert cache.bytes_used == 10
    cache.put("exact", b"e" * 1000)
    assert "exact" in cache and cache.bytes_used == 1000


def test_replacing_a_key_counts_its_bytes_once() -> None:
    cache = BlockCache(10_000, Stats())
    cache.put("k", b"1" * 4000)
    cache.put("k", b"2" * 3000)
    assert cache.bytes_used == 3000
    assert cache.get("k") == b"2" * 3000


@given(
    max_bytes=st.integers(0, 5000),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 20), st.integers(0, 2000)), max_size=200),
)
def test_byte_bound_and_lru_against_a_model(max_bytes: int, ops: list) -> None:
    stats = Stats()
    cache = BlockCache(max_bytes, stats)
    model: dict[int, bytes] = {}  # insertion order = recency order, oldest first
    hits = misses = 0
    for i, (is_put, key, size) in enumerate(ops):
        if is_put:
            block = i.to_bytes(2, "big") * (size // 2)
            cache.put(key, block)
            if len(block) <= max_bytes:
                model.pop(key, None)
                model[key] = block
                while sum(map(len, model.values())) > max_bytes:
                    del model[next(iter(model))]
        else:
            got = cache.get(key)
            if key in model:
                hits += 1
                model[key] = model.pop(key)
            else:
                misses += 1
            assert got == model.get(key)
        assert cache.bytes_used == sum(map(len, model.values())) <= max_bytes
        assert len(cache) == len(model)
    assert (stats.cache_hits, stats.cache_misses) == (hits, misses)
