"""One disk image of the store as the read path sees it: where it is, how it is cut into
blocks, and the digests that verify those blocks. Plain data: no I/O, no trio."""

from dataclasses import dataclass


@dataclass
class Image:
    image_id: int
    url: str
    size_bytes: int
    block_size: int  # cache and fetch unit, a multiple of digest_block_size
    digest_block_size: int
    digests_path: str | None = None  # None: no per-block digests (single-image mount)
    digests_sha256: str | None = None
    digests: list[bytes] | None = None  # loaded on first open (remote.metadata.DigestLoader)
    validator: str | None = None  # ETag/Last-Modified pinned by the first reply
