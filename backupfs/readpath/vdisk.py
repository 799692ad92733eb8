"""Reading what a file of the mount serves (`DiskReader`): a raw image goes straight to
the block reader; a virtual disk (qcow2, VMDK, VHD, VHDX, and their chains) goes through
its layers' tables, which are blocks of stored images like any other: fetched, verified
and cached by BlockReader; a volume (store.image.Volume: an LVM volume of several
segments or stripes) is cut into pieces of its disks, each read as above.

A read of virtual `[start, end)` asks the top layer which table pieces it needs, reads
them, maps the range into extents and reads each: DATA from a stored file, COMPRESSED
units decompressed in a worker thread (and kept a while: one unit serves many reads),
ZERO made here, PARENT read from the next layer at the same virtual offsets (zeros past
a smaller parent). Extents are read concurrently; the whole read has the block reader's
deadline. Readahead follows the virtual stream: the window the stream tracker asks for
is mapped in the background and its stored ranges prefetched.
"""

import logging
from collections.abc import Awaitable, Callable, Hashable
from functools import partial

import trio
from cachetools import LRUCache

from backupfs.errors import FetchError, FormatError
from backupfs.ranges import block_range
from backupfs.readpath.blocks import BlockReader
from backupfs.readpath.plans import PlanCursor
from backupfs.readpath.readahead import StreamTracker
from backupfs.store.formats.base import (
    Extent,
    Kind,
    Layer,
    TableRead,
    check_extents,
    check_read,
    open_reads_checked,
)
from backupfs.store.formats.registry import LAYERS
from backupfs.store.image import ChainLink, Image, Served, VirtualDisk, Volume

log = logging.getLogger(__name__)
UNIT_CACHE_BYTES = 16 << 20  # decompressed clusters/grains kept for the reads that follow
TABLE_CACHE_BYTES = 8 << 20  # blocks of second-level tables (L2, grain tables, bitmaps)


class DiskReader:
    def __init__(self, reader: BlockReader) -> None:
        self.reader = reader
        self._locks: dict[int, trio.Lock] = {}
        self._units: LRUCache[Hashable, bytes] = LRUCache(UNIT_CACHE_BYTES, getsizeof=len)
        self._tables: LRUCache[Hashable, bytes] = LRUCache(TABLE_CACHE_BYTES, getsizeof=len)
        self._reading_ahead: set[int] = set()  # disks (_key) with a readahead task running

    async def open(self, disk: VirtualDisk) -> None:
        """Read every layer's header and first-level tables (once per disk)."""
        if disk.layers is not None:
            return
        async with self._locks.setdefault(disk.disk_id, trio.Lock()):
            if disk.layers is None:
                layers = [await self._open_link(link) for link in disk.links]
                if layers[0].virtual_size != disk.size_bytes:
                    raise FormatError(
                        f"{disk.name}: virtual size {layers[0].virtual_size} in its header, "
                        f"{disk.size_bytes} in the catalogue"
                    )
                disk.layers = layers

    async def _open_link(self, link: ChainLink) -> Layer:
        layer = LAYERS[link.format](link.name, link.sizes[0])
        for read in open_reads_checked(layer, lambda: link.sizes, link.name):
            layer.load(read, await self._stored(link, read))
        if len(layer.files) != len(link.images) - 1:
            raise FormatError(f"{link.name}: its extent files are not the catalogue's")
        return layer

    async def _stored(self, link: ChainLink, read: TableRead) -> bytes:
        image = link.images[read.file]
        return await self.reader.read(image, read.offset, read.length, counted=False)

    async def _table(self, link: ChainLink, read: TableRead) -> bytes:
        """A slice of a second-level table. Every read of a disk asks for a few entries of
        one, at each depth of its chain: the table's blocks are kept here (verified, as
        the block reader gave them), so most of those cost a dict lookup."""
        image = link.images[read.file]
        bs = image.block_size
        first, last = read.offset // bs, (read.offset + read.length - 1) // bs
        kept = [self._tables.get((image.image_id, n)) for n in range(first, last + 1)]
        blocks = [b for b in kept if b is not None]
        if len(blocks) != len(kept):
            span = await self.reader.read(image, first * bs, (last + 1 - first) * bs, counted=False)
            blocks = [span[i : i + bs] for i in range(0, len(span), bs)]
            for n, block in enumerate(blocks, first):
                self._tables[(image.image_id, n)] = block
        data = b"".join(blocks)
        lo = read.offset - first * bs
        return data[lo : lo + read.length]

    async def read(
        self,
        disk: Served,
        offset: int,
        size: int,
        tracker: StreamTracker | None = None,
        counted: bool = True,
    ) -> bytes:
        """Exactly `size` bytes at virtual `offset`, fewer only at the end; FetchError,
        FormatError (a table that breaks the format's rules). `counted`: served to a
        reader (False: the background fill)."""
        if isinstance(disk, Image):
            return await self.reader.read(disk, offset, size, tracker, counted=counted)
        if isinstance(disk, VirtualDisk):
            await self.open(disk)
        end = min(offset + size, disk.size_bytes)
        if offset >= end:
            return b""
        note = _ReadNote()
        with trio.move_on_after(self.reader.config.read_deadline_s):
            if isinstance(disk, VirtualDisk):
                data = await self._read_layer(disk, 0, offset, end, note)
            else:
                data = await self._read_volume(disk, offset, end, note)
            if counted:
                self.reader.stats.bytes_served += len(data)  # zeros included, tables not
            # Reads of planned blocks say nothing about what comes next (as for raw images).
            if tracker is not None and not (note.data and note.planned):
                self._read_ahead(disk, offset, end - offset, tracker)
            return data
        raise FetchError(f"no data within {self.reader.config.read_deadline_s:g}s", transient=True)

    async def _read_volume(self, volume: Volume, start: int, end: int, note: "_ReadNote") -> bytes:
        """Virtual `[start, end)` of a volume: its pieces read at once, from raw images
        (uncounted, like a chain's stored reads) or through their disks' tables."""
        return await _gathered([partial(self._piece, disk, offset, length, note)
                                for disk, offset, length in volume.pieces(start, end)])  # fmt: skip

    async def _piece(
        self, disk: Image | VirtualDisk, offset: int, length: int, note: "_ReadNote"
    ) -> bytes:
        if isinstance(disk, Image):
            note.saw(self.reader, disk, offset, length)
            return await self.reader.read(disk, offset, length, counted=False)
        await self.open(disk)
        return await self._read_layer(disk, 0, offset, offset + length, note)

    async def extents(self, disk: VirtualDisk, depth: int, start: int, end: int) -> list[Extent]:
        """Virtual `[start, end)` of layer `depth` as extents (its tables read as needed)."""
        assert disk.layers is not None
        layer, link = disk.layers[depth], disk.links[depth]
        tables: dict[TableRead, bytes] = {}
        for read in layer.table_reads(start, end):
            check_read(layer, read, link.sizes, link.name)
            tables[read] = await self._table(link, read)
        extents = layer.map(start, end, tables)
        check_extents(extents, start, end, link.sizes, link.name)
        return extents

    async def _read_layer(
        self, disk: VirtualDisk, depth: int, start: int, end: int, note: "_ReadNote"
    ) -> bytes:
        extents = await self.extents(disk, depth, start, end)
        if len(extents) == 1:
            return await self._extent_bytes(disk, depth, extents[0], note)
        return await _gathered([partial(self._extent_bytes, disk, depth, e, note) for e in extents])

    async def _extent_bytes(
        self, disk: VirtualDisk, depth: int, extent: Extent, note: "_ReadNote"
    ) -> bytes:
        assert disk.layers is not None
        link = disk.links[depth]
        if extent.kind is Kind.ZERO:
            return bytes(extent.length)
        if extent.kind in (Kind.DATA, Kind.COMPRESSED):
            stored = extent.length if extent.kind is Kind.DATA else extent.stored_length
            note.saw(self.reader, link.images[extent.file], extent.offset, stored)
        if extent.kind is Kind.DATA:
            return await self._stored(link, TableRead(extent.file, extent.offset, extent.length))
        if extent.kind is Kind.COMPRESSED:
            unit = await self._unit(disk.layers[depth], link, extent)
            lo = extent.start - extent.unit_start
            return unit[lo : lo + extent.length]
        if depth + 1 == len(disk.layers):  # nothing below: unallocated is zeros
            return bytes(extent.length)
        below_end = min(extent.start + extent.length, disk.layers[depth + 1].virtual_size)
        below = b""
        if extent.start < below_end:
            below = await self._read_layer(disk, depth + 1, extent.start, below_end, note)
        return below + bytes(extent.length - len(below))  # past a smaller parent: zeros

    async def _unit(self, layer: Layer, link: ChainLink, extent: Extent) -> bytes:
        key = (link.images[extent.file].image_id, extent.offset)
        unit = self._units.get(key)
        if unit is None:
            read = TableRead(extent.file, extent.offset, extent.stored_length)
            stored = await self._stored(link, read)
            unit = await trio.to_thread.run_sync(layer.decompress, extent, stored)
            if len(unit) != extent.unit_length:
                raise FormatError(f"{layer.format} unit at {extent.offset} inflated wrongly")
            self._units[key] = unit
        return unit

    def _read_ahead(
        self, disk: VirtualDisk | Volume, offset: int, size: int, tracker: StreamTracker
    ) -> None:
        ahead = tracker.on_read(offset, size, self.reader.readahead_limit())
        key = _key(disk)
        if ahead is not None and key not in self._reading_ahead:
            self._reading_ahead.add(key)
            self.reader.nursery.start_soon(self._prefetch, disk, *ahead)

    async def _prefetch(self, disk: VirtualDisk | Volume, start: int, end: int) -> None:
        """Start fetching the stored ranges behind virtual `[start, end)`; failures only
        cost the readahead (the read that needs the bytes reports them)."""
        try:
            await self.prefetch(disk, start, end)
        except (FetchError, FormatError) as exc:
            log.debug("readahead of %s stopped: %s", disk.name, exc)
        finally:
            self._reading_ahead.discard(_key(disk))

    async def plan(
        self, disk: Served, start: int, end: int, cursor: PlanCursor, position: int
    ) -> None:
        """BlockReader.plan of what `[start, end)` of a served disk reads."""
        for image, lo, hi in await self.stored_ranges(disk, start, end):
            self.reader.plan(image, lo, hi, cursor, position)

    async def prefetch(self, disk: Served, start: int, end: int) -> None:
        """BlockReader.prefetch of what `[start, end)` of a served disk reads."""
        for image, lo, hi in await self.stored_ranges(disk, start, end):
            self.reader.prefetch(image, lo, hi)

    async def fetched(self, disk: Served, start: int, end: int) -> None:
        """Return once what `[start, end)` of a served disk reads is in the cache."""
        for image, lo, hi in await self.stored_ranges(disk, start, end):
            await self.reader.fetched(image, lo, hi)

    async def stored_ranges(
        self, disk: Served, start: int, end: int
    ) -> list[tuple[Image, int, int]]:
        """The ranges of stored images that virtual `[start, end)` reads, down the chain:
        what a read plan or readahead fetches. Zeros cost nothing."""
        if isinstance(disk, Image):
            return [(disk, start, min(end, disk.size_bytes))] if start < end else []
        if isinstance(disk, Volume):
            found = []
            for piece, lo, length in disk.pieces(start, end):
                found += await self.stored_ranges(piece, lo, lo + length)
            return _coalesced(found)
        await self.open(disk)
        assert disk.layers is not None
        end = min(end, disk.size_bytes)
        out: list[tuple[Image, int, int]] = []
        todo = [(0, start, end)] if start < end else []
        while todo:
            depth, lo, hi = todo.pop()
            link = disk.links[depth]
            for e in await self.extents(disk, depth, lo, hi):
                if e.kind is Kind.DATA:
                    out.append((link.images[e.file], e.offset, e.offset + e.length))
                elif e.kind is Kind.COMPRESSED:
                    out.append((link.images[e.file], e.offset, e.offset + e.stored_length))
                elif e.kind is Kind.PARENT and depth + 1 < len(disk.layers):
                    top = min(e.start + e.length, disk.layers[depth + 1].virtual_size)
                    if e.start < top:
                        todo.append((depth + 1, e.start, top))
        return _coalesced(out)


async def _gathered(reads: list[Callable[[], Awaitable[bytes]]]) -> bytes:
    """The bytes of `reads`, run at once, joined in order; the first FetchError or
    FormatError among them is the read's error."""
    if len(reads) == 1:
        return await reads[0]()
    parts: list[bytes] = [b""] * len(reads)
    failed: list[Exception] = []

    async def one(i: int) -> None:
        try:
            parts[i] = await reads[i]()
        except (FetchError, FormatError) as exc:
            failed.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(len(reads)):
            nursery.start_soon(one, i)
    if failed:
        raise failed[0]
    return b"".join(parts)


def _key(disk: VirtualDisk | Volume) -> int:
    """One id space for both: a volume's ids are the control directory's inodes."""
    return disk.disk_id if isinstance(disk, VirtualDisk) else disk.volume_id


class _ReadNote:
    """What one read touched: whether it read stored data, and whether all of it was
    planned or hinted (checked before the read consumes the plan's blocks)."""

    def __init__(self) -> None:
        self.data, self.planned = False, True

    def saw(self, reader: BlockReader, image: Image, offset: int, length: int) -> None:
        self.data = True
        if self.planned:
            blocks = block_range(offset, length, image.block_size, image.size_bytes)
            self.planned = reader.plans.active and reader.plans.covers(image, blocks)


def _coalesced(ranges: list[tuple[Image, int, int]]) -> list[tuple[Image, int, int]]:
    """Ranges of one image that touch or overlap made one (compressed clusters lie end
    to end, and share sectors): one fetch, and planned bytes counted once. Ranges with
    a gap stay apart: in a chain the gaps are clusters that images above hold, and
    fetching them too was measured to cost bytes and win no time (docs/benchmarks.md)."""
    out: list[tuple[Image, int, int]] = []
    for image, lo, hi in sorted(ranges, key=lambda r: (r[0].image_id, r[1])):
        if out and out[-1][0] is image and lo <= out[-1][2]:
            out[-1] = (image, out[-1][1], max(hi, out[-1][2]))
        else:
            out.append((image, lo, hi))
    return out
