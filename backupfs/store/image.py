"""What a file of the mount serves, as the read path sees it: a stored disk image (where
it is, how it is cut into blocks, the digests that verify those blocks), a guest's disk
read through a chain of images, or a volume concatenated (and striped) from ranges of
those. Plain data: no I/O, no trio."""

import bisect
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


Disk = Image | VirtualDisk  # what a volume's runs lie on


@dataclass(frozen=True)
class VolumeRun:
    """`size_bytes` of a volume from `start`, taken from its areas (disk, offset) in
    stripes of `stripe_bytes`, each area in turn; one area: a plain range of its disk."""

    start: int
    size_bytes: int
    stripe_bytes: int
    areas: tuple[tuple[Disk, int], ...]


@dataclass
class Volume:
    """An LVM logical volume that is not one range of one disk (several segments, stripes,
    several disks), served whole as one file: what device-mapper would concatenate."""

    volume_id: int  # unique among what the mount serves (an inode of the control directory)
    name: str
    size_bytes: int
    runs: list[VolumeRun]  # in order, end to end from 0
    starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.starts = [r.start for r in self.runs]

    def pieces(self, start: int, end: int) -> list[tuple[Disk, int, int]]:
        """(disk, offset, length) of each piece of `[start, end)`, in order."""
        out: list[tuple[Disk, int, int]] = []
        end = min(end, self.size_bytes)
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while start < end and i < len(self.runs):
            run = self.runs[i]
            lo, hi = start - run.start, min(end, run.start + run.size_bytes) - run.start
            count = len(run.areas)
            while lo < hi:
                chunk, within = divmod(lo, run.stripe_bytes)
                row, stripe = divmod(chunk, count)
                take = min(run.stripe_bytes - within, hi - lo)
                disk, offset = run.areas[stripe]
                out.append((disk, offset + row * run.stripe_bytes + within, take))
                lo += take
            start, i = run.start + hi, i + 1
        return out


Served = Image | VirtualDisk | Volume  # what a file of the mount serves


def stored_images(served: Served) -> list[Image]:
    """The stored files a served disk reads: the image itself, every file of its chain,
    or those of every disk a volume lies on."""
    if isinstance(served, Image):
        return [served]
    if isinstance(served, VirtualDisk):
        return [image for link in served.links for image in link.images]
    seen: dict[int, Image] = {}
    for run in served.runs:
        for disk, _ in run.areas:
            seen.update((i.image_id, i) for i in stored_images(disk))
    return list(seen.values())
