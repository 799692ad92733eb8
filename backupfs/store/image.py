"""One disk image of the store as the read path sees it: where it is, how it is cut into
blocks, and the digests that verify those blocks. Plain data: no I/O, no trio."""

from dataclasses import dataclass
from typing import Protocol


class BlockDigests(Protocol):
    """The SHA-256 record of each digest block of an image (remote.digests holds the
    kinds): loaded whole (store format 1) or chunk by chunk as reads need them (2)."""

    # A record of 32 zero bytes means "this block is all zeros" (format 2 only).
    marks_zeros: bool

    async def records(self, first: int, stop: int) -> bytes:
        """The records of digest blocks `[first, stop)`, concatenated; raises FetchError
        when they cannot be fetched and verified."""
        ...


@dataclass
class Image:
    image_id: int
    url: str
    size_bytes: int
    block_size: int  # cache and fetch unit, a multiple of digest_block_size
    digest_block_size: int
    digests_path: str | None = None  # None: no per-block digests (single-image mount)
    digests_sha256: str | None = None  # format 1: the whole digest file's SHA-256
    digest_index_sha256: str | None = None  # format 2: its chunk index's SHA-256
    digests: BlockDigests | None = None  # set on first open (remote.metadata.DigestLoader)
    validator: str | None = None  # ETag/Last-Modified pinned by the first reply
