"""One disk image of the store as the read path sees it: where it is, how it is cut into
blocks, and the digests that verify those blocks. Plain data: no I/O, no trio."""

from dataclasses import dataclass, field
from typing import Protocol

from backupfs.store.formats.base import Layer


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


@dataclass
class ChainLink:
    """One image of a chain: its format and stored files (the image, then the extent files
    a VMDK descriptor names), each an Image of its own, shared with every chain it is in."""

    format: str
    images: list[Image]
    sizes: list[int] = field(init=False)  # of the images: what table offsets are checked by
    name: str = field(init=False)  # the stored file's name, for messages

    def __post_init__(self) -> None:
        self.sizes = [i.size_bytes for i in self.images]
        self.name = self.images[0].url.rsplit("/", 1)[-1]


@dataclass
class VirtualDisk:
    """A guest's disk served at its virtual size through the tables of a chain of images,
    top first (readpath.vdisk reads it)."""

    disk_id: int
    name: str  # for messages: host/snapshot/file of the top image
    size_bytes: int  # the virtual size the catalogue gives; checked against the header
    links: list[ChainLink]
    layers: list[Layer] | None = None  # opened from the headers on first open


def stored_images(served: "Image | VirtualDisk") -> list[Image]:
    """The stored files a served disk reads: the image itself, or every file of its chain."""
    if isinstance(served, Image):
        return [served]
    return [image for link in served.links for image in link.images]
