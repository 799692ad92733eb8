"""The qcow2 table reader (versions 2 and 3): `Qcow2Layer` maps virtual ranges of a qcow2
image to its data clusters, compressed clusters (zlib or zstd), zeros or its backing file.

Open reads the first cluster (header, extensions, backing file name: qcow2_header.py) and
the active L1 table; mapping a range reads only the slice of each L2 table that covers it.
Supported: standard, zero and compressed clusters, extended L2 entries (subclusters), dirty
images. Internal snapshots are ignored: what is read is the active L1, the image's current
state, as `qemu-img convert` reads it. Refused (FormatError): encryption, external data
files, images marked corrupt, unknown incompatible features, and any table or cluster
offset that is unaligned, in the header cluster, overlaps the L1 table or is past the end
of the file. Sans-I/O: see base.py for how a layer is driven.
"""

import struct
import zlib
from collections.abc import Iterator, Mapping

import zstandard

from backupfs.errors import FormatError
from backupfs.store.formats.base import Extent, Kind, ParentRef, TableRead
from backupfs.store.formats.qcow2_header import (
    COMPRESSION_ZSTD,
    MAGIC,
    Header,
    backing_name,
    backing_name_end,
    check_features,
    parse_extensions,
    parse_header,
)

FORMAT = "qcow2"
HEAD_READ = 64 << 10  # the first read at open; more of the first cluster only if needed
MAX_L1_BYTES = 32 << 20  # qemu's own limit on the active L1 table
MAX_VIRTUAL_SIZE = 1 << 63
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55: L1 entries, standard L2 entries
COMPRESSED_FLAG = 1 << 62
ZERO_FLAG = 1  # standard cluster descriptor bit 0 (v3, without extended L2)
SECTOR = 512  # the unit of a compressed cluster's length
SUBCLUSTERS = 32
ZSTD_SKIPPABLE = 0x184D2A50  # the magic of skippable frames, low 4 bits free
ZSTD_FEED = 64  # input bytes per step when a zstd frame does not say its size


def probe(head: bytes, tail: bytes, file_size: int) -> bool:
    """Whether the file is a qcow2 image (any version: the layer refuses what it cannot read)."""
    return head[:4] == MAGIC


class Qcow2Layer:
    """One qcow2 image of a chain; see the module docstring."""

    format = FORMAT

    def __init__(self, name: str, file_size: int) -> None:
        self.name = name
        self.file_size = file_size
        self.virtual_size = 0
        self.parent: ParentRef | None = None
        self.files: list[str] = []
        self._header: Header | None = None
        self._pending = [TableRead(0, 0, min(file_size, HEAD_READ))]
        self._l1 = b""
        self._l1_entries = 0
        self._l1_span = (0, 0)  # the bytes [start, end) the active L1 table occupies
        self._cluster_bits = 0
        self._entry_size = 8
        self._l2_entries = 0
        self._hole = Kind.ZERO

    # -- open ------------------------------------------------------------------------------

    def open_reads(self) -> list[TableRead]:
        if self.file_size <= 0:
            raise FormatError(f"{self.name}: qcow2 header is truncated (empty file)")
        return list(self._pending)

    def load(self, read: TableRead, data: bytes) -> None:
        if read not in self._pending:
            raise FormatError(f"{self.name}: qcow2 was given a read it did not ask for: {read}")
        self._pending = []
        if self._header is None:
            self._load_first_bytes(data)
        else:
            self._load_l1(read, data)

    def _load_first_bytes(self, buf: bytes) -> None:
        header = parse_header(self.name, buf)
        more = min(self.file_size, header.cluster_size)
        if len(buf) < header.header_length:
            self._ask_more_of_first_cluster(buf, more)
            return
        ext = parse_extensions(self.name, header, buf, self.file_size)
        if ext is None or len(buf) < min(backing_name_end(header), more):
            self._ask_more_of_first_cluster(buf, more)
            return
        check_features(self.name, header, ext)
        path = backing_name(self.name, header, buf, self.file_size)
        self.parent = None if path is None else ParentRef(path, ext.backing_format)
        self._hole = Kind.ZERO if self.parent is None else Kind.PARENT
        self._set_geometry(header)
        self._header = header
        if self._l1_entries:
            self._pending = [TableRead(0, header.l1_offset, self._l1_entries * 8)]

    def _ask_more_of_first_cluster(self, buf: bytes, more: int) -> None:
        if len(buf) >= more:  # everything there is was given: the file ends too early
            raise FormatError(f"{self.name}: qcow2 header is truncated ({len(buf)} bytes)")
        self._pending = [TableRead(0, 0, more)]

    def _set_geometry(self, header: Header) -> None:
        """Virtual size, L2 geometry and the active L1 table's place, checked."""
        name, cluster_size = self.name, header.cluster_size
        if header.virtual_size >= MAX_VIRTUAL_SIZE:
            raise FormatError(f"{name}: qcow2 virtual size {header.virtual_size} is absurd")
        self._cluster_bits = header.cluster_bits
        self._entry_size = 16 if header.extended_l2 else 8
        self._l2_entries = cluster_size // self._entry_size
        covered = cluster_size * self._l2_entries
        needed = -(-header.virtual_size // covered)
        if needed * 8 > MAX_L1_BYTES or header.l1_size * 8 > MAX_L1_BYTES:
            entries = max(needed, header.l1_size)
            raise FormatError(
                f"{name}: qcow2 L1 table of {entries} entries is larger than "
                f"{MAX_L1_BYTES >> 20} MiB"
            )
        if header.l1_size < needed:
            raise FormatError(
                f"{name}: qcow2 L1 table of {header.l1_size} entries is too small for a "
                f"virtual size of {header.virtual_size} (needs {needed})"
            )
        self.virtual_size = header.virtual_size
        self._l1_entries = needed
        self._l1_span = (header.l1_offset, header.l1_offset + header.l1_size * 8)
        if needed == 0:
            return
        offset = header.l1_offset
        if offset % cluster_size or offset < cluster_size:
            raise FormatError(f"{name}: qcow2 L1 table offset {offset:#x} is not a valid cluster")
        if offset + needed * 8 > self.file_size:
            raise FormatError(f"{name}: qcow2 L1 table at {offset:#x} is past the end of the file")

    def _load_l1(self, read: TableRead, data: bytes) -> None:
        if len(data) != read.length:
            raise FormatError(
                f"{self.name}: qcow2 L1 table at {read.offset:#x} is past the end of the file"
            )
        self._l1 = data

    # -- mapping ---------------------------------------------------------------------------

    def table_reads(self, start: int, end: int) -> list[TableRead]:
        reads = []
        for l1_index, first, last in self._l2_spans(start, end):
            read = self._l2_slice(l1_index, first, last)
            if read is not None:
                reads.append(read)
        return reads

    def map(self, start: int, end: int, tables: Mapping[TableRead, bytes]) -> list[Extent]:
        runs = _Runs()
        bits = self._cluster_bits
        for l1_index, first, last in self._l2_spans(start, end):
            base = l1_index * self._l2_entries
            lo = max(start, (base + first) << bits)
            hi = min(end, (base + last + 1) << bits)
            read = self._l2_slice(l1_index, first, last)
            if read is None:  # no L2 table: the whole span is unallocated
                runs.add(lo, hi - lo, self._hole)
                continue
            data = tables.get(read)
            if data is None or len(data) != read.length:
                got = "missing" if data is None else f"{len(data)} of {read.length} bytes"
                raise FormatError(f"{self.name}: qcow2 L2 table at {read.offset:#x}: {got}")
            entries = struct.iter_unpack(">QQ" if self._entry_size == 16 else ">Q", data)
            for index, entry in enumerate(entries, base + first):
                cluster = index << bits
                self._map_cluster(
                    runs, entry, cluster, max(lo, cluster), min(hi, cluster + (1 << bits))
                )
        return runs.extents()

    def _l2_spans(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(L1 index, first and last L2 index) of the clusters that [start, end) touches."""
        if self._header is None or self._pending:
            raise FormatError(f"{self.name}: qcow2 layer used before it is open")
        if not 0 <= start <= end <= self.virtual_size:
            raise ValueError(f"range [{start}, {end}) is outside the virtual disk")
        if start == end:
            return
        first_cluster, last_cluster = start >> self._cluster_bits, (end - 1) >> self._cluster_bits
        per_table = self._l2_entries
        for l1_index in range(first_cluster // per_table, last_cluster // per_table + 1):
            first = max(first_cluster, l1_index * per_table) - l1_index * per_table
            last = min(last_cluster, l1_index * per_table + per_table - 1) - l1_index * per_table
            yield l1_index, first, last

    def _l2_slice(self, l1_index: int, first: int, last: int) -> TableRead | None:
        """The bytes of L2 table `l1_index` holding entries first..last (None: no table)."""
        (entry,) = struct.unpack_from(">Q", self._l1, l1_index * 8)
        offset = entry & OFFSET_MASK
        if not offset:
            return None
        self._check_cluster(offset, f"L2 table (L1 index {l1_index})")
        read = TableRead(
            0, offset + first * self._entry_size, (last - first + 1) * self._entry_size
        )
        if read.offset + read.length > self.file_size:
            raise FormatError(
                f"{self.name}: qcow2 L2 table at {offset:#x} is past the end of the file"
            )
        return read

    def _check_cluster(self, offset: int, what: str) -> None:
        """A host cluster (L2 table, data) must be aligned, past the header cluster, clear
        of the L1 table and start in the file."""
        size = 1 << self._cluster_bits
        if offset % size:
            problem = "is not aligned to a cluster"
        elif offset < size:
            problem = "is in the header cluster"
        elif offset < self._l1_span[1] and self._l1_span[0] < offset + size:
            problem = "overlaps the L1 table"
        elif offset >= self.file_size:
            problem = "is past the end of the file"
        else:
            return
        raise FormatError(f"{self.name}: qcow2 {what} at {offset:#x} {problem}")

    def _map_cluster(
        self, runs: "_Runs", entry: tuple[int, ...], cluster: int, lo: int, hi: int
    ) -> None:
        """Add what virtual [lo, hi) of the cluster at virtual offset `cluster` maps to."""
        descriptor = entry[0]
        if descriptor & COMPRESSED_FLAG:
            runs.add_unit(self._compressed_extent(descriptor, cluster, lo, hi))
        elif len(entry) == 2:
            self._map_subclusters(runs, descriptor & OFFSET_MASK, entry[1], cluster, lo, hi)
        elif descriptor & ZERO_FLAG:
            self._check_zero_flag(descriptor, cluster)
            runs.add(lo, hi - lo, Kind.ZERO)
        elif descriptor & OFFSET_MASK:
            self._add_data(runs, descriptor & OFFSET_MASK, cluster, lo, hi)
        else:
            runs.add(lo, hi - lo, self._hole)

    def _check_zero_flag(self, descriptor: int, cluster: int) -> None:
        assert self._header is not None
        if self._header.version < 3:
            raise FormatError(
                f"{self.name}: qcow2 zero cluster flag at virtual {cluster:#x} in a v2 image"
            )
        offset = descriptor & OFFSET_MASK
        if offset % (1 << self._cluster_bits):
            raise FormatError(f"{self.name}: qcow2 zero cluster at {offset:#x} is not aligned")

    def _add_data(self, runs: "_Runs", host: int, cluster: int, lo: int, hi: int) -> None:
        """Virtual [lo, hi) of a data cluster at host offset `host` (checked)."""
        self._check_cluster(host, f"data cluster (virtual {cluster:#x})")
        if host + (hi - cluster) > self.file_size:
            raise FormatError(
                f"{self.name}: qcow2 data cluster at {host:#x} is cut short by the end of the file"
            )
        runs.add(lo, hi - lo, Kind.DATA, host + (lo - cluster))

    def _map_subclusters(
        self, runs: "_Runs", host: int, bitmap: int, cluster: int, lo: int, hi: int
    ) -> None:
        """An extended L2 entry: 32 subclusters, each allocated, zero or unallocated."""
        allocated, zeros = bitmap & 0xFFFF_FFFF, bitmap >> 32
        if allocated & zeros:
            raise FormatError(
                f"{self.name}: qcow2 subclusters both allocated and zero at virtual {cluster:#x}"
            )
        if allocated and not host:
            raise FormatError(
                f"{self.name}: qcow2 allocated subclusters without a host cluster at virtual "
                f"{cluster:#x}"
            )
        if host:
            self._check_cluster(host, f"data cluster (virtual {cluster:#x})")
        size = (1 << self._cluster_bits) // SUBCLUSTERS
        for index in range((lo - cluster) // size, (hi - 1 - cluster) // size + 1):
            sub_lo = max(lo, cluster + index * size)
            sub_hi = min(hi, cluster + (index + 1) * size)
            if allocated >> index & 1:
                self._add_data(runs, host, cluster, sub_lo, sub_hi)
            elif zeros >> index & 1:
                runs.add(sub_lo, sub_hi - sub_lo, Kind.ZERO)
            else:
                runs.add(sub_lo, sub_hi - sub_lo, self._hole)

    def _compressed_extent(self, descriptor: int, cluster: int, lo: int, hi: int) -> Extent:
        """Decode a compressed cluster descriptor: host offset in the low x bits, then the
        count of 512-byte sectors beyond the first (x = 62 - (cluster_bits - 8))."""
        x = 62 - (self._cluster_bits - 8)
        host = descriptor & ((1 << x) - 1)
        sectors = (descriptor >> x & ((1 << (self._cluster_bits - 8)) - 1)) + 1
        if host >> 56:
            raise FormatError(f"{self.name}: qcow2 compressed cluster offset {host:#x} is absurd")
        where = f"{self.name}: qcow2 compressed cluster at {host:#x} (virtual {cluster:#x})"
        if host < (1 << self._cluster_bits):
            raise FormatError(f"{where} is in the header cluster")
        if host >= self.file_size:
            raise FormatError(f"{where} is past the end of the file")
        stored = min(sectors * SECTOR - host % SECTOR, self.file_size - host)
        return Extent(
            start=lo,
            length=hi - lo,
            kind=Kind.COMPRESSED,
            offset=host,
            stored_length=stored,
            unit_start=cluster,
            unit_length=1 << self._cluster_bits,
        )

    # -- compressed clusters -------------------------------------------------------------

    def decompress(self, extent: Extent, data: bytes) -> bytes:
        if extent.kind is not Kind.COMPRESSED or self._header is None:
            raise ValueError(f"not a compressed extent of an open qcow2 layer: {extent}")
        size = 1 << self._cluster_bits
        where = f"{self.name}: qcow2 compressed cluster at {extent.offset:#x}"
        if self._header.compression_type == COMPRESSION_ZSTD:
            out = _inflate_zstd(data, size, where)
        else:
            out = _inflate_zlib(data, size, where)
        if len(out) < size:
            raise FormatError(f"{where} inflates to {len(out)} bytes, less than a cluster")
        return out


def _inflate_zlib(data: bytes, size: int, where: str) -> bytes:
    """Raw deflate with a 4 KiB window (as qemu writes and reads it); at most `size` + 1
    bytes are produced. Bytes after the stream (sector padding) are ignored, as qemu does."""
    try:
        out = zlib.decompressobj(-12).decompress(data, size + 1)
    except zlib.error as exc:
        raise FormatError(f"{where} does not inflate: {exc}") from None
    if len(out) > size:
        raise FormatError(f"{where} inflates past its cluster size ({size} bytes)")
    return out


def _inflate_zstd(data: bytes, size: int, where: str) -> bytes:
    """One or more zstd frames that together make exactly `size` bytes (qemu writes one
    frame with its content size; it reads several). Bytes after them are ignored."""
    dctx = zstandard.ZstdDecompressor(max_window_size=max(size, 1 << 10))
    out = bytearray()
    view = memoryview(data)
    try:
        while len(out) < size:
            if not view:
                break
            obj = dctx.decompressobj()
            content_size = 0
            if not _zstd_skippable(view):  # a skippable frame makes nothing, whatever its size
                content_size = zstandard.get_frame_parameters(view).content_size
            if content_size == zstandard.CONTENTSIZE_UNKNOWN:
                view = _zstd_frame_in_steps(obj, view, out, size)
            elif content_size > size - len(out):
                raise FormatError(f"{where} inflates past its cluster size ({size} bytes)")
            else:
                out += obj.decompress(view)
                view = memoryview(obj.unused_data)
            if len(out) > size:
                raise FormatError(f"{where} inflates past its cluster size ({size} bytes)")
            if not obj.eof:
                raise FormatError(f"{where}: zstd frame is cut short")
    except zstandard.ZstdError as exc:
        raise FormatError(f"{where} does not inflate: zstd: {exc}") from None
    return bytes(out)


def _zstd_skippable(view: memoryview) -> bool:
    return len(view) >= 4 and struct.unpack_from("<I", view)[0] & ~0xF == ZSTD_SKIPPABLE


def _zstd_frame_in_steps(
    obj: "zstandard.ZstdDecompressionObj", view: memoryview, out: bytearray, size: int
) -> memoryview:
    """A frame of unknown size, fed a few bytes at a time so that what it makes beyond
    `size` stays small (a zstd block makes at most 128 KiB); the input after the frame."""
    at = 0
    while at < len(view) and not obj.eof and len(out) <= size:
        out += obj.decompress(view[at : at + ZSTD_FEED])
        at += ZSTD_FEED
    return memoryview(obj.unused_data + bytes(view[at:])) if obj.eof else view[len(view) :]


class _Runs:
    """Extents in order, merging a piece into the previous one when it continues it: same
    kind, and for DATA the next bytes of the file. Compressed units stay one each."""

    def __init__(self) -> None:
        self._done: list[Extent] = []
        self._kind: Kind | None = None
        self._start = self._length = self._offset = 0

    def add(self, start: int, length: int, kind: Kind, offset: int = 0) -> None:
        if (
            kind is self._kind
            and start == self._start + self._length
            and (kind is not Kind.DATA or offset == self._offset + self._length)
        ):
            self._length += length
            return
        self._flush()
        self._kind, self._start, self._length, self._offset = kind, start, length, offset

    def add_unit(self, extent: Extent) -> None:
        self._flush()
        self._done.append(extent)

    def _flush(self) -> None:
        if self._kind is not None and self._length:
            self._done.append(Extent(self._start, self._length, self._kind, 0, self._offset))
        self._kind = None

    def extents(self) -> list[Extent]:
        self._flush()
        return self._done
