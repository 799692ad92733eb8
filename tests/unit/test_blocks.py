"""The read path of backupfs.readpath.blocks.BlockReader over a fake in-memory store.

The fake stands in for `StoreClient.fetch_range`: it serves bytes from a model, records
every call, and can be held (gate) or made to fail, which is what the single-flight,
error-propagation and readahead logic need to be observed.
"""

import os
import random
from collections.abc import Awaitable

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.errors import FetchError
from backupfs.readpath.plans import PlanCursor
from backupfs.readpath.readahead import ReadaheadConfig, StreamTracker
from tests.support.fakestore import BS, FakeStore, KiB, fresh, make_image, make_reader


async def test_concurrent_readers_of_one_block_share_one_fetch(nursery: trio.Nursery) -> None:
    data = os.urandom(64 * KiB)
    store = FakeStore({1: data})
    store.gate = trio.Event()
    reader = make_reader(store, nursery)
    image = make_image(data)
    results: dict[int, bytes] = {}

    async def read(i: int) -> None:
        results[i] = await reader.read(image, 100 + i, 50, fresh())

    async with trio.open_nursery() as readers:
        for i in range(20):
            readers.start_soon(read, i)
        await trio.testing.wait_all_tasks_blocked()
        assert store.calls == [(1, 0, BS)]
        assert len(results) == 0
        store.gate.set()
    assert store.calls == [(1, 0, BS)]
    assert results == {i: data[100 + i : 150 + i] for i in range(20)}
    assert reader.stats.bytes_served == 20 * 50


async def test_overlapping_concurrent_reads_fetch_each_block_once(nursery: trio.Nursery) -> None:
    data = os.urandom(64 * KiB)
    store = FakeStore({1: data})
    store.gate = trio.Event()
    reader = make_reader(store, nursery, request_size=2 * BS)
    image = make_image(data)
    spans = [(0, 3 * BS), (BS, 3 * BS), (2 * BS + 5, 100), (BS - 1, 6 * BS), (5 * BS, 1)]
    results: dict[int, bytes] = {}

    async def read(i: int, offset: int, size: int) -> None:
        results[i] = await reader.read(image, offset, size, fresh())

    async with trio.open_nursery() as readers:
        for i, (offset, size) in enumerate(spans):
            readers.start_soon(read, i, offset, size)
        await trio.testing.wait_all_tasks_blocked()
        store.gate.set()
    assert results == {i: data[o : o + s] for i, (o, s) in enumerate(spans)}
    blocks = store.fetched_blocks()
    assert blocks == sorted(set(blocks)) == list(range(7))  # each once, nothing extra
    assert all(e - s <= 2 * BS for _, s, e in store.calls)  # request_size respected


async def test_large_read_is_split_into_parallel_requests(nursery: trio.Nursery) -> None:
    data = os.urandom(64 * KiB)
    store = FakeStore({1: data})
    store.gate = trio.Event()
    reader = make_reader(store, nursery, request_size=3 * BS)
    image = make_image(data)
    async with trio.open_nursery() as readers:
        out: list[bytes] = []
        readers.start_soon(lambda: _append(out, reader.read(image, 0, 10 * BS, fresh())))
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(store.calls) == [
            (1, 0, 3 * BS),
            (1, 3 * BS, 6 * BS),
            (1, 6 * BS, 9 * BS),
            (1, 9 * BS, 10 * BS),
        ]
        assert store.in_flight == 4
        store.gate.set()
    assert out == [data[: 10 * BS]]


async def _append(out: list[bytes], coro: Awaitable[bytes]) -> None:
    out.append(await coro)


async def test_only_missing_blocks_are_fetched(nursery: trio.Nursery) -> None:
    data = os.urandom(64 * KiB)
    store = FakeStore({1: data})
    reader = make_reader(store, nursery)
    image = make_image(data)
    assert await reader.read(image, 2 * BS, BS, fresh()) == data[2 * BS : 3 * BS]
    assert await reader.read(image, 5 * BS, 10, fresh()) == data[5 * BS : 5 * BS + 10]
    store.calls.clear()
    assert await reader.read(image, 0, 7 * BS, fresh()) == data[: 7 * BS]
    assert sorted(store.calls) == [(1, 0, 2 * BS), (1, 3 * BS, 5 * BS), (1, 6 * BS, 7 * BS)]


async def test_failed_fetch_reaches_every_waiter_and_a_later_read_retries(
    nursery: trio.Nursery,
) -> None:
    data = os.urandom(64 * KiB)
    store = FakeStore({1: data})
    store.gate = trio.Event()
    store.fail_at = {3 * BS}
    reader = make_reader(store, nursery, failed_ttl_s=0.2)
    image = make_image(data)
    errors: list[FetchError] = []
    results: list[bytes] = []

    async def read(offset: int) -> None:
        try:
            results.append(await reader.read(image, offset, 100, fresh()))
        except FetchError as exc:
            errors.append(exc)

    async with trio.open_nursery() as readers:
        for i in range(6):
            readers.start_soon(read, 3 * BS + i * 10)
        await trio.testing.wait_all_tasks_blocked()
        assert len(store.calls) == 1
        store.gate.set()
    assert results == []
    assert len(errors) == 6
    assert all(isinstance(e, FetchError) and str(e) == f"boom at {3 * BS}" for e in errors)
    assert all(e.transient for e in errors)
    assert reader.stats.read_errors == 1
    assert (1, 3) not in reader.cache

    # A read right after fails at once with the same error: no new chain of attempts
    # (the kernel retries a failed readahead page by page).
    with pytest.raises(FetchError, match=f"boom at {3 * BS}"):
        await reader.read(image, 3 * BS + 500, 100, fresh())
    assert store.calls == [(1, 3 * BS, 4 * BS)]

    # Nothing is stuck: once the failure is old, the next read fetches again and succeeds.
    await trio.sleep(0.25)
    assert await reader.read(image, 3 * BS, 100, fresh()) == data[3 * BS : 3 * BS + 100]
    assert store.calls == [(1, 3 * BS, 4 * BS)] * 2


async def test_failure_of_one_run_does_not_hide_the_others(nursery: trio.Nursery) -> None:
    data = os.urandom(64 * KiB)
    store = FakeStore({1: data})
    store.fail_at = {0}  # the first run fails, the second succeeds
    reader = make_reader(store, nursery, request_size=BS)
    image = make_image(data)
    with pytest.raises(FetchError, match="boom at 0"):
        await reader.read(image, 0, 2 * BS, fresh())
    await trio.testing.wait_all_tasks_blocked()
    assert (1, 1) in reader.cache  # the good run still landed
    store.calls.clear()
    assert await reader.read(image, 0, 2 * BS, fresh()) == data[: 2 * BS]
    assert store.calls == [(1, 0, BS)]


async def test_cancelled_reader_does_not_cancel_the_fetch_for_others(
    nursery: trio.Nursery,
) -> None:
    data = os.urandom(64 * KiB)
    store = FakeStore({1: data})
    store.gate = trio.Event()
    reader = make_reader(store, nursery)
    image = make_image(data)
    got: list[bytes] = []
    async with trio.open_nursery() as readers:
        impatient = trio.CancelScope()

        async def read_impatient() -> None:
            with impatient:
                await reader.read(image, 0, 10, fresh())
                pytest.fail("the impatient reader should have been cancelled")

        readers.start_soon(read_impatient)
        readers.start_soon(lambda: _append(got, reader.read(image, 5, 10, fresh())))
        await trio.testing.wait_all_tasks_blocked()
        impatient.cancel()
        await trio.testing.wait_all_tasks_blocked()
        store.gate.set()
    assert got == [data[5:15]]
    assert store.calls == [(1, 0, BS)]


async def test_reads_at_block_boundaries_and_eof(nursery: trio.Nursery) -> None:
    data = os.urandom(10 * BS + 123)
    store = FakeStore({1: data})
    reader = make_reader(store, nursery)
    image = make_image(data)
    size = len(data)
    cases = [
        (0, 1),
        (BS - 1, 2),
        (BS, BS),
        (BS - 1, BS + 2),
        (3 * BS + 7, 5 * BS),
        (size - 1, 1),
        (size - 100, 4096),
        (10 * BS, 123),
        (10 * BS, 124),
        (0, size + 1),
    ]
    for offset, n in cases:
        got = await reader.read(image, offset, n, fresh())
        assert got == data[offset : offset + n]
        assert len(got) == min(n, size - offset)  # short only at EOF
    calls = len(store.calls)
    for offset, n in [(size, 1), (size + 5000, 10), (100, 0)]:
        assert await reader.read(image, offset, n, fresh()) == b""
    assert len(store.calls) == calls  # nothing fetched for empty reads


async def test_empty_image(nursery: trio.Nursery) -> None:
    store = FakeStore({1: b""})
    reader = make_reader(store, nursery)
    assert await reader.read(make_image(b""), 0, 4096, fresh()) == b""
    assert store.calls == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    file_size=st.integers(0, 40_000),
    block_size=st.sampled_from([512, 1024, 4096]),
    request_blocks=st.integers(1, 5),
    cache_blocks=st.integers(1, 64),
    reads=st.lists(st.tuples(st.integers(0, 45_000), st.integers(0, 12_000)), max_size=25),
    sequential=st.booleans(),
)
def test_reads_match_the_model(
    seed: int,
    file_size: int,
    block_size: int,
    request_blocks: int,
    cache_blocks: int,
    reads: list[tuple[int, int]],
    sequential: bool,
) -> None:
    data = random.Random(seed).randbytes(file_size)
    if sequential:  # back-to-back reads, so readahead kicks in as well
        reads = [(sum(n for _, n in reads[:i]), n) for i, (_, n) in enumerate(reads)]

    async def main() -> None:
        store = FakeStore({1: data})
        config = ReadaheadConfig(
            initial_bytes=2 * block_size, max_bytes=8 * block_size, slack_bytes=2 * block_size
        )
        tracker = StreamTracker(config)
        async with trio.open_nursery() as nursery:
            reader = make_reader(
                store, nursery, cache_blocks * block_size, request_blocks * block_size
            )
            image = make_image(data, block_size=block_size)
            for offset, size in reads:
                got = await reader.read(image, offset, size, tracker)
                assert got == data[offset : offset + size]
            assert reader.cache.bytes_used <= cache_blocks * block_size
        assert all(e - s <= request_blocks * block_size for _, s, e in store.calls)

    trio.run(main)


async def test_sequential_reads_prefetch_ahead(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    data = os.urandom(1 << 20)
    store = FakeStore({1: data}, latency=0.010)
    reader = make_reader(store, nursery, cache_bytes=1 << 20, request_size=16 * KiB)
    image = make_image(data)
    config = ReadaheadConfig(initial_bytes=32 * KiB, max_bytes=128 * KiB, slack_bytes=32 * KiB)
    tracker = StreamTracker(config)
    chunk = 8 * KiB
    ahead_calls = 0
    t0 = trio.current_time()
    for i in range(len(data) // chunk):
        offset = i * chunk
        before = len(store.calls)
        assert await reader.read(image, offset, chunk, tracker) == data[offset : offset + chunk]
        new_calls = store.calls[before:]
        ahead_calls += sum(1 for _, s, _ in new_calls if s >= offset + chunk)
        if i == 1:
            # The second read started readahead beyond what was asked for.
            assert any(s >= offset + chunk for _, s, _ in new_calls)
    assert ahead_calls > 10
    # Readahead never fetches a block twice, and every block came in exactly once.
    blocks = store.fetched_blocks()
    assert blocks == list(range(len(data) // BS))
    # Without readahead every block would be a miss and each read would wait for one
    # round trip (128 reads * 10 ms); with it most blocks are cached or in flight early.
    assert reader.stats.cache_misses < (len(data) // BS) // 4
    assert trio.current_time() - t0 < 0.5 * (len(data) // chunk) * store.latency
    assert store.max_in_flight > 1


async def test_random_reads_fetch_only_what_is_read(nursery: trio.Nursery) -> None:
    data = os.urandom(4 << 20)
    store = FakeStore({1: data})
    reader = make_reader(store, nursery, cache_bytes=4 << 20)
    image = make_image(data)
    tracker = StreamTracker(ReadaheadConfig(slack_bytes=64 * KiB))
    rng = random.Random(99)
    slots = list(range(0, len(data), 256 * KiB))  # further apart than the slack
    rng.shuffle(slots)
    wanted = set()
    for base in slots:
        offset = base + rng.randrange(0, 200 * KiB)
        got = await reader.read(image, offset, 4 * KiB, tracker)
        assert got == data[offset : offset + 4 * KiB]
        wanted |= {offset // BS, (offset + 4 * KiB - 1) // BS}
        await trio.testing.wait_all_tasks_blocked()
    assert store.fetched_blocks() == sorted(wanted)


async def test_fetched_blocks_are_cached(nursery: trio.Nursery) -> None:
    data = os.urandom(64 * KiB)
    other = os.urandom(64 * KiB)
    store = FakeStore({1: data, 2: other})
    reader = make_reader(store, nursery)
    image, image2 = make_image(data), make_image(other, image_id=2)
    assert await reader.read(image, 100, 3 * BS, fresh()) == data[100 : 100 + 3 * BS]
    assert len(store.calls) == 1
    assert all((1, n) in reader.cache for n in range(4))
    hits = reader.stats.cache_hits
    assert await reader.read(image, 200, 2 * BS, fresh()) == data[200 : 200 + 2 * BS]
    assert len(store.calls) == 1  # served from the cache
    assert reader.stats.cache_hits == hits + 3
    # Another image's block with the same number is a different block.
    assert await reader.read(image2, 100, 10, fresh()) == other[100:110]
    assert store.calls[1:] == [(2, 0, BS)]


async def test_block_evicted_before_its_reader_wakes_is_fetched_again(
    nursery: trio.Nursery,
) -> None:
    data = os.urandom(64 * KiB)
    store = FakeStore({1: data})
    reader = make_reader(store, nursery, cache_bytes=BS, request_size=8 * BS)  # one block
    image = make_image(data)
    assert await reader.read(image, 0, 4 * BS, fresh()) == data[: 4 * BS]
    assert len(reader.cache) == 1


async def test_planned_blocks_leave_the_cache_once_read_and_move_the_cursor(
    nursery: trio.Nursery,
) -> None:
    data = os.urandom(16 * BS)
    store = FakeStore({1: data})
    reader = make_reader(store, nursery)
    image = make_image(data)
    cursor = PlanCursor()
    reader.plan(image, 100, 2 * BS, cursor, position=2 * BS - 100)
    reader.plan(image, 4 * BS, 5 * BS, cursor, position=3 * BS - 100)
    assert reader.stats.plan_bytes == 3 * BS - 100
    await reader.fetched(image, 0, 2 * BS)
    await reader.fetched(image, 4 * BS, 5 * BS)
    assert sorted(store.calls) == [(1, 0, 2 * BS), (1, 4 * BS, 5 * BS)]
    assert await reader.read(image, 0, BS + 10, fresh()) == data[: BS + 10]
    assert cursor.position == 2 * BS - 100
    assert (1, 0) not in reader.cache  # all its planned bytes were served
    assert (1, 1) in reader.cache  # 10 of its bytes only
    assert await reader.read(image, 4 * BS, BS, fresh()) == data[4 * BS : 5 * BS]
    assert cursor.position == 3 * BS - 100 and (1, 4) not in reader.cache
    reader.forget_plan(cursor)
    assert await reader.read(image, BS, BS, fresh()) == data[BS : 2 * BS]
    assert (1, 1) in reader.cache  # a forgotten plan's blocks age out normally


async def test_reads_of_planned_or_warmed_blocks_do_not_drive_readahead(
    nursery: trio.Nursery,
) -> None:
    data = os.urandom(64 * BS)
    store = FakeStore({1: data})
    reader = make_reader(store, nursery, request_size=BS)
    image = make_image(data)
    config = ReadaheadConfig(initial_bytes=4 * BS, max_bytes=8 * BS, slack_bytes=BS)
    reader.prefetch(image, 0, 4 * BS)
    reader.plan(image, 4 * BS, 8 * BS, PlanCursor(), position=4 * BS)
    await reader.fetched(image, 0, 8 * BS)
    tracker = StreamTracker(config)
    for offset in range(0, 8 * BS, BS):
        assert await reader.read(image, offset, BS, tracker) == data[offset : offset + BS]
    await trio.testing.wait_all_tasks_blocked()
    assert store.fetched_blocks() == list(range(8))
    assert tracker.streams == []
    # The same reads of blocks nobody planned do start readahead.
    for offset in range(16 * BS, 20 * BS, BS):
        assert await reader.read(image, offset, BS, tracker) == data[offset : offset + BS]
    await trio.testing.wait_all_tasks_blocked()
    assert max(store.fetched_blocks()) >= 20


async def test_a_read_ends_at_its_deadline_while_the_fetch_goes_on(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    from backupfs.readpath.blocks import BlockReader, ReaderConfig
    from backupfs.readpath.cache import BlockCache
    from backupfs.stats import Stats

    data = os.urandom(8 * BS)
    store = FakeStore({1: data})
    store.gate = trio.Event()  # the store never answers
    stats = Stats()
    config = ReaderConfig(request_size=BS, read_deadline_s=30.0)
    reader = BlockReader(store, BlockCache(1 << 20, stats), nursery, config, stats)
    image = make_image(data)
    started = trio.current_time()
    with pytest.raises(FetchError, match="no data within 30s"):
        await reader.read(image, 0, 100, fresh())
    assert trio.current_time() - started == pytest.approx(30.0)
    store.gate.set()  # the fetch was not cancelled: a later read gets its block
    assert await reader.read(image, 0, 100, fresh()) == data[:100]
    assert len(store.calls) == 1


async def test_demand_fetches_are_urgent_readahead_is_not(nursery: trio.Nursery) -> None:
    data = os.urandom(64 * BS)
    store = FakeStore({1: data})
    reader = make_reader(store, nursery, request_size=4 * BS)
    image = make_image(data)
    tracker = fresh()
    for offset in range(0, 8 * BS, BS):  # a sequential stream: readahead starts
        await reader.read(image, offset, BS, tracker)
    await trio.testing.wait_all_tasks_blocked()
    urgent = {start for _, start, _ in store.calls if start in store.urgent_starts}
    assert 0 in urgent  # the first read's own block
    assert any(start not in store.urgent_starts for _, start, _ in store.calls)  # readahead


async def test_background_reads_fetch_at_background_priority(nursery: trio.Nursery) -> None:
    """The fill's metadata walk reads through the mount; nobody waits for its misses, so
    every demand read takes a connection before them."""
    from backupfs.readpath.blocks import background_reads

    data = os.urandom(16 * BS)
    store = FakeStore({1: data})
    reader = make_reader(store, nursery, request_size=BS)
    image = make_image(data)
    with background_reads():
        assert await reader.read(image, 0, 2 * BS) == data[: 2 * BS]
    assert await reader.read(image, 8 * BS, BS) == data[8 * BS : 9 * BS]
    assert {start for _, start, _ in store.calls} == {0, BS, 8 * BS}
    assert store.urgent_starts == {8 * BS}
