"""What the read path reads blocks from: the HTTP store client, or a cache wrapped around it.

A `typing.Protocol`, so that the read path imports nothing of HTTP and a test's in-memory
fake type-checks like the real client.
"""

from typing import Protocol

from backupfs.store.image import Image


class RangeSource(Protocol):
    async def fetch_range(
        self, image: Image, start: int, end: int, block_size: int, urgent: bool = False
    ) -> list[bytes]:
        """Bytes `[start, end)` of `image`, verified, cut into `block_size` blocks (the last
        may be short); raises FetchError. `urgent`: a reader waits for it (not readahead,
        a plan or warm), so it is sent before prefetches that wait for a connection."""
        ...
