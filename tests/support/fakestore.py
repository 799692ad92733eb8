"""An in-memory store for read-path unit tests: it stands in for `StoreClient.fetch_range`
(the RangeSource protocol), serves bytes from a model, records every call, and can be held
(gate) or made to fail, which is what single-flight, error propagation and readahead need
to be observed. Also the small builders those tests share."""

import trio

from backupfs.errors import FetchError
from backupfs.readpath.blocks import BlockReader, ReaderConfig
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.readahead import ReadaheadConfig, StreamTracker
from backupfs.stats import Stats
from backupfs.store.image import Image

KiB = 1 << 10
BS = 4 * KiB


class FakeStore:
    def __init__(self, images: dict[int, bytes], latency: float = 0.0) -> None:
        self.images = images
        self.latency = latency
        self.calls: list[tuple[int, int, int]] = []  # (image_id, start, end)
        self.urgent_starts: set[int] = set()  # starts of fetches asked for as urgent
        self.gate: trio.Event | None = None
        self.fail_at: set[int] = set()  # starts whose next fetch fails
        self.in_flight = 0
        self.max_in_flight = 0

    async def fetch_range(
        self, image: Image, start: int, end: int, block_size: int, urgent: bool = False
    ) -> list[bytes]:
        data = self.images[image.image_id]
        assert start % block_size == 0, "fetch not aligned to a block"
        assert 0 <= start < end <= len(data), "fetch outside the image"
        assert end % block_size == 0 or end == len(data), "fetch ends inside a block"
        self.calls.append((image.image_id, start, end))
        if urgent:
            self.urgent_starts.add(start)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await trio.sleep(self.latency)
            if start in self.fail_at:
                self.fail_at.discard(start)
                raise FetchError(f"boom at {start}", transient=True)
            body = data[start:end]
            return [body[i : i + block_size] for i in range(0, len(body), block_size)]
        finally:
            self.in_flight -= 1

    def fetched_blocks(self, block_size: int = BS) -> list[int]:
        return sorted(
            n for _, s, e in self.calls for n in range(s // block_size, -(-e // block_size))
        )


def make_image(data: bytes, image_id: int = 1, block_size: int = BS) -> Image:
    return Image(
        image_id=image_id,
        url=f"http://store.invalid/h/s/{image_id}.img",
        size_bytes=len(data),
        block_size=block_size,
        digest_block_size=block_size,
    )


def make_reader(
    store: FakeStore,
    nursery: trio.Nursery,
    cache_bytes: int = 1 << 20,
    request_size: int = 64 * KiB,
    failed_ttl_s: float = 0.0,
) -> BlockReader:
    """A reader over `store`; failed blocks are not remembered unless `failed_ttl_s`."""
    stats = Stats()
    config = ReaderConfig(request_size=request_size, failed_ttl_s=failed_ttl_s)
    return BlockReader(store, BlockCache(cache_bytes, stats), nursery, config, stats)


def fresh() -> StreamTracker:
    return StreamTracker(ReadaheadConfig())
