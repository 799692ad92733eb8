"""VMDK table reader (VMware's "Virtual Disk Format 1.1"), sans-I/O.

Holds `probe` and `VmdkLayer`, which reads hosted sparse extents (monolithicSparse, delta
disks, version 2's zeroed grains), streamOptimized (deflated grains behind markers, the
grain directory in the footer when the header puts it at the end) and descriptor files
(`vmdk_descriptor.py`) of FLAT, hosted SPARSE (twoGbMaxExtentSparse) and ZERO extents.
The grain directory is loaded at open; `table_reads` asks only for the slice of each grain
table that a range needs; adjacent grains that are contiguous are merged.

Refused with FormatError: a bad magic or version, altered newline check bytes, a grain not
a power of two of 8 to 2048 sectors, grain tables not of 512 entries, compression other than
deflate with markers, a capacity over 64 TiB or whose directory is over MAX_OPEN_BYTES, a
directory, table or grain outside its file or over the header, descriptor or directory, a
footer without its markers, a compressed grain marked for another sector, running past the
file or not inflating to exactly the grain, a sparse extent unlike its descriptor line, and
what the descriptor parser refuses. An extent file of a descriptor may not have its
directory at the end (the layer does not know its size); the reader catches grains past it.
"""

import struct
import sys
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import partial

from backupfs.errors import FormatError
from backupfs.store.formats import vmdk_descriptor as text
from backupfs.store.formats.base import MAX_OPEN_BYTES, Extent, Kind, ParentRef, TableRead

FORMAT = "vmdk"
SECTOR = text.SECTOR
MAGIC = b"KDMV"  # 0x564d444b, little-endian
HEAD_READ = 64 << 10  # the first read: the header and, as qemu and VMware write, the descriptor
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")  # SparseExtentHeader, packed
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
GTES_PER_GT = 512
GTE = 4  # bytes of a grain table or directory entry
MIN_GRAIN, MAX_GRAIN = 8, 2048  # sectors: 4 KiB .. 1 MiB (VMware and qemu write 128)
FLAG_NL_DETECT, FLAG_ZEROED_GRAIN, FLAG_COMPRESSED, FLAG_MARKERS = 1, 1 << 2, 1 << 16, 1 << 17
DEFLATE = 1
CHECK_BYTES = b"\n \r\n"
GRAIN_MARKER = struct.Struct("<QI")  # lba (sectors), size of the compressed data after it
META_MARKER = struct.Struct("<QII")  # sectors, size (0), type
MARKER_EOS, MARKER_FOOTER = 0, 3
FOOTER_SPAN = 3 * SECTOR  # footer marker, footer (a header), end-of-stream marker
GTE_ZEROED = 1  # with FLAG_ZEROED_GRAIN: a grain of zeros
PAST = "runs past the end of the file"
Tables = Mapping[TableRead, bytes]


def probe(head: bytes, tail: bytes, file_size: int) -> bool:
    """A hosted sparse extent (magic KDMV) or a descriptor file."""
    return head[:4] == MAGIC or text.is_descriptor(head, file_size)


@dataclass(frozen=True)
class _Header:
    capacity: int  # sectors
    grain: int  # bytes
    desc_offset: int  # bytes (0: no embedded descriptor)
    desc_size: int  # bytes
    gd_sector: int
    overhead: int  # bytes: where grains may start
    zeroed_grain: bool
    compressed: bool

    @property
    def gd_entries(self) -> int:
        grains = -(-self.capacity * SECTOR // self.grain)
        return -(-grains // GTES_PER_GT)

    def over_metadata(self, start: int, end: int) -> bool:
        """Bytes `[start, end)` of the file run over the header, descriptor or directory."""
        desc, gd = self.desc_offset, self.gd_sector * SECTOR
        over_gd = _overlap(start, end, gd, gd + self.gd_entries * GTE)
        return start < SECTOR or over_gd or _overlap(start, end, desc, desc + self.desc_size)


@dataclass(frozen=True)
class _Sparse:
    """A hosted sparse extent: stored file `file`, at virtual byte `start`."""

    file: int
    start: int
    header: _Header
    gd: "array[int]"


@dataclass(frozen=True)
class _Piece:
    """An extent of the disk: FLAT (file `file` from `offset`), SPARSE (file's) or ZERO."""

    start: int
    length: int
    kind: str
    file: int = 0
    offset: int = 0


class VmdkLayer:
    format: str
    virtual_size: int
    parent: ParentRef | None
    files: list[str]

    def __init__(self, name: str, file_size: int) -> None:
        self.format = FORMAT
        self.virtual_size = 0
        self.parent = None
        self.files = []
        self._name = name
        self._size = file_size
        self._pieces: list[_Piece] = []
        self._starts: list[int] = []
        self._sparse: dict[int, _Sparse] = {}
        self._expected: dict[int, int] = {}  # file -> sectors its descriptor line says
        self._pending: dict[TableRead, Callable[[bytes], None]] = {}
        self._asked = 0
        if file_size <= 0:
            raise self._error(0, "file is empty")
        self._ask(TableRead(0, 0, min(file_size, HEAD_READ)), self._load_head)

    def open_reads(self) -> list[TableRead]:
        return list(self._pending)

    def load(self, read: TableRead, data: bytes) -> None:
        handler = self._pending.pop(read, None)
        if handler is None:
            raise self._error(0, f"was given {read}, which it did not ask for")
        handler(data)

    def _ask(self, read: TableRead, handler: Callable[[bytes], None]) -> None:
        self._asked += read.length
        if self._asked > MAX_OPEN_BYTES:
            raise self._error(0, f"tables larger than {MAX_OPEN_BYTES >> 20} MiB")
        if read in self._pending:
            raise self._error(read.file, f"tables overlap at {read.offset}")
        self._pending[read] = handler

    def _where(self, file: int) -> str:
        return "vmdk" if file == 0 else f"vmdk extent {self.files[file - 1]!r}"

    def _error(self, file: int, message: str) -> FormatError:
        """The error to raise: the image's name, what (part of it), `message`."""
        return FormatError(f"{self._name}: {self._where(file)} {message}")

    def _load_head(self, data: bytes) -> None:
        if data[:4] == MAGIC:
            header = self._start_sparse(0, data)
            self._load_embedded_descriptor(header, data)
        elif data.startswith(text.MAGIC_LINE):
            if self._size > text.MAX_DESCRIPTOR:
                raise self._error(0, f"descriptor file larger than {text.MAX_DESCRIPTOR >> 10} KiB")
            desc = text.parse_descriptor(self._name, data, embedded=False)
            self.parent = text.parent_of(self._name, desc)
            self._add_extents(desc)
        else:
            raise self._error(0, f"magic {data[:4]!r}: not a sparse extent nor a descriptor")

    def _load_embedded_descriptor(self, header: _Header, head: bytes) -> None:
        offset = header.desc_offset
        if offset == 0 or header.desc_size == 0:
            return
        if offset >= self._size:
            raise self._error(0, f"descriptor at {offset} is past the end of the file")
        length = min(header.desc_size, text.MAX_DESCRIPTOR, self._size - offset)
        if offset + length <= len(head):
            self._parse_embedded(head[offset : offset + length])
        else:
            self._ask(TableRead(0, offset, length), self._parse_embedded)

    def _parse_embedded(self, data: bytes) -> None:
        desc = text.parse_descriptor(self._name, data, embedded=True)
        self.parent = text.parent_of(self._name, desc)

    def _add_extents(self, desc: text.Descriptor) -> None:
        start, pieces = 0, []
        for line in desc.extents:
            length = line.sectors * SECTOR
            if line.file is None:
                pieces.append(_Piece(start, length, "ZERO"))
            else:
                self.files.append(line.file)
                file = len(self.files)
                pieces.append(_Piece(start, length, line.kind, file, line.offset * SECTOR))
                if line.kind == "SPARSE":
                    self._expected[file] = line.sectors
                    self._ask(TableRead(file, 0, SECTOR), partial(self._load_extent, file))
            start += length
        self._set_pieces(pieces)

    def _set_pieces(self, pieces: list[_Piece]) -> None:
        self._pieces = pieces
        self._starts = [p.start for p in pieces]
        self.virtual_size = pieces[-1].start + pieces[-1].length

    def _load_extent(self, file: int, data: bytes) -> None:
        if data[:4] != MAGIC:
            raise self._error(file, "is not a VMDK sparse extent")
        self._start_sparse(file, data)

    def _start_sparse(self, file: int, data: bytes) -> _Header:
        header = self._parse_header(file, data)
        if header.gd_sector != GD_AT_END:
            self._ask_gd(file, header)
        elif file != 0:
            raise self._error(file, "grain directory at the end: not supported in an extent")
        elif self._size < header.overhead + FOOTER_SPAN:
            raise self._error(0, "stream is too short for its footer")
        else:
            self._ask(TableRead(0, self._size - FOOTER_SPAN, FOOTER_SPAN), self._load_footer)
        return header

    def _load_footer(self, data: bytes) -> None:
        if len(data) < FOOTER_SPAN:
            raise self._error(0, "footer is cut short")
        _, size, kind = META_MARKER.unpack_from(data, 0)
        if size != 0 or kind != MARKER_FOOTER:
            raise self._error(0, "stream has no footer marker before its end")
        if META_MARKER.unpack_from(data, 2 * SECTOR) != (0, 0, MARKER_EOS):
            raise self._error(0, "stream does not end with an end-of-stream marker")
        header = self._parse_header(0, data[SECTOR : 2 * SECTOR])
        if header.gd_sector == GD_AT_END:
            raise self._error(0, "footer puts the grain directory at the end too")
        self._ask_gd(0, header)

    def _parse_header(self, file: int, data: bytes) -> _Header:
        if len(data) < HEADER.size:
            raise self._error(file, "header is cut short")
        fields = HEADER.unpack_from(data)
        magic, version, flags, capacity, grain, desc_offset, desc_size, gtes = fields[:8]
        gd_sector, overhead, check, algorithm = fields[9], fields[10], fields[12], fields[13]
        if magic != MAGIC:
            raise self._error(file, f"header has bad magic {magic!r}")
        if not 1 <= version <= 3:
            raise self._error(file, f"sparse extent version {version} is not supported")
        if flags & FLAG_NL_DETECT and check != CHECK_BYTES:
            raise self._error(file, "newline check bytes altered (a text-mode transfer?)")
        if grain & (grain - 1) or not MIN_GRAIN <= grain <= MAX_GRAIN:
            raise self._error(file, f"grain of {grain} sectors is not a power of 2 in 8..2048")
        if gtes != GTES_PER_GT:
            raise self._error(file, f"grain tables of {gtes} entries, not {GTES_PER_GT}")
        if algorithm not in (0, DEFLATE) or bool(flags & FLAG_COMPRESSED) != (algorithm != 0):
            raise self._error(file, f"compression {algorithm} (flags {flags:#x}) not supported")
        if algorithm and not flags & FLAG_MARKERS:
            raise self._error(file, "compressed grains without markers are not supported")
        if not 0 < capacity <= text.MAX_VIRTUAL_SIZE // SECTOR:
            raise self._error(file, f"capacity of {capacity} sectors is absurd")
        zeroed = bool(flags & FLAG_ZEROED_GRAIN)
        sizes = (grain * SECTOR, desc_offset * SECTOR, desc_size * SECTOR)
        return _Header(capacity, *sizes, gd_sector, overhead * SECTOR, zeroed, algorithm == DEFLATE)

    def _ask_gd(self, file: int, header: _Header) -> None:
        gd_offset, gd_length = header.gd_sector * SECTOR, header.gd_entries * GTE
        if gd_length > MAX_OPEN_BYTES:
            raise self._error(file, f"grain directory of {gd_length} bytes is over the bound")
        if gd_offset < SECTOR or (file == 0 and gd_offset + gd_length > self._size):
            raise self._error(file, f"grain directory at {gd_offset} is outside the file")
        if file == 0 and header.overhead > self._size:
            raise self._error(file, f"grains start at {header.overhead}, past the end")
        if file == 0:
            self._set_pieces([_Piece(0, header.capacity * SECTOR, "SPARSE")])
        elif header.capacity != (want := self._expected[file]):
            raise self._error(file, f"capacity {header.capacity} is not the descriptor's {want}")
        start = next(p.start for p in self._pieces if p.file == file and p.kind == "SPARSE")
        load = partial(self._load_gd, file, start, header)
        self._ask(TableRead(file, gd_offset, gd_length), load)

    def _load_gd(self, file: int, start: int, header: _Header, data: bytes) -> None:
        if len(data) < header.gd_entries * GTE:
            raise self._error(file, "grain directory is past the end of the file")
        self._sparse[file] = _Sparse(file, start, header, _entries(data))

    def table_reads(self, start: int, end: int) -> list[TableRead]:
        reads = []
        for piece, lo, hi in self._pieces_in(start, end):
            if piece.kind == "SPARSE":
                sparse = self._sparse[piece.file]
                for gt, first, last in _gt_spans(sparse.header.grain, lo, hi):
                    read = self._gt_read(sparse, gt, first, last)
                    if read is not None:
                        reads.append(read)
        return reads

    def map(self, start: int, end: int, tables: Tables) -> list[Extent]:
        if start < 0 or end > self.virtual_size:
            raise self._error(0, f"range [{start}, {end}) is outside the disk")
        out: list[Extent] = []
        for piece, lo, hi in self._pieces_in(start, end):
            if piece.kind == "ZERO":
                _append(out, Extent(piece.start + lo, hi - lo, Kind.ZERO))
            elif piece.kind == "FLAT":
                extent = Extent(piece.start + lo, hi - lo, Kind.DATA, piece.file, piece.offset + lo)
                _append(out, extent)
            else:
                for extent in self._map_sparse(self._sparse[piece.file], lo, hi, tables):
                    _append(out, extent)
        return out

    def _pieces_in(self, start: int, end: int) -> Iterator[tuple[_Piece, int, int]]:
        """The pieces over virtual `[start, end)`, each with the part in it (relative)."""
        for piece in self._pieces[max(0, bisect_right(self._starts, start) - 1) :]:
            if piece.start >= end:
                return
            lo, hi = max(start, piece.start), min(end, piece.start + piece.length)
            if lo < hi:
                yield piece, lo - piece.start, hi - piece.start

    def _gt_read(self, sparse: _Sparse, gt: int, first: int, last: int) -> TableRead | None:
        """The slice of entries `[first, last]` of grain table `gt`; None: no table."""
        sector = sparse.gd[gt]
        if sector == 0:
            return None
        offset, length = sector * SECTOR + first * GTE, (last + 1 - first) * GTE
        past = sparse.file == 0 and offset + length > self._size
        if past or sparse.header.over_metadata(sector * SECTOR, (sector + 4) * SECTOR):
            raise self._error(sparse.file, f"grain table {gt} at sector {sector} is misplaced")
        return TableRead(sparse.file, offset, length)

    def _map_sparse(self, sparse: _Sparse, lo: int, hi: int, tables: Tables) -> Iterator[Extent]:
        grain = sparse.header.grain
        for gt, first, last in _gt_spans(grain, lo, hi):
            read = self._gt_read(sparse, gt, first, last)
            if read is None:
                s = max(lo, (gt * GTES_PER_GT + first) * grain)
                e = min(hi, (gt * GTES_PER_GT + last + 1) * grain)
                yield Extent(sparse.start + s, e - s, self._unallocated)
                continue
            data = tables.get(read)
            if data is None:
                raise self._error(0, f"was not given grain table {read}")
            if len(data) < read.length:
                raise self._error(sparse.file, f"grain table at {read.offset} is past the end")
            for i, entry in enumerate(_entries(data)):
                at = (gt * GTES_PER_GT + first + i) * grain
                yield self._grain(sparse, entry, at, max(lo, at), min(hi, at + grain))

    @property
    def _unallocated(self) -> Kind:
        return Kind.ZERO if self.parent is None else Kind.PARENT

    def _grain(self, sparse: _Sparse, entry: int, at: int, lo: int, hi: int) -> Extent:
        """Extent bytes `[lo, hi)` of the grain at `at` (relative to the sparse extent)."""
        header, s = sparse.header, sparse.start
        if entry == 0:
            return Extent(s + lo, hi - lo, self._unallocated)
        if entry == GTE_ZEROED and header.zeroed_grain:
            return Extent(s + lo, hi - lo, Kind.ZERO)
        offset = entry * SECTOR
        unit = min(header.grain, header.capacity * SECTOR - at)
        self._check_grain(sparse, offset, GRAIN_MARKER.size if header.compressed else unit)
        if not header.compressed:
            return Extent(s + lo, hi - lo, Kind.DATA, sparse.file, offset + lo - at)
        stored = GRAIN_MARKER.size + _deflate_bound(header.grain)
        if sparse.file == 0:
            stored = min(stored, self._size - offset)
        # Extent(start, length, kind, file, offset, stored_length, unit_start, unit_length)
        return Extent(s + lo, hi - lo, Kind.COMPRESSED, sparse.file, offset, stored, s + at, unit)

    def _check_grain(self, sparse: _Sparse, offset: int, length: int) -> None:
        """A grain's bytes are in its file, after the header, descriptor and directory."""
        end = offset + length
        past = sparse.file == 0 and end > self._size
        if offset < sparse.header.overhead or past or sparse.header.over_metadata(offset, end):
            raise self._error(sparse.file, f"grain at {offset} is outside the grain area")

    def decompress(self, extent: Extent, data: bytes) -> bytes:
        sparse = self._sparse.get(extent.file)
        where = f"{self._name}: {self._where(extent.file)} compressed grain at {extent.offset}"
        if sparse is None or not sparse.header.compressed:
            raise FormatError(f"{where}: the extent is not compressed")
        if len(data) < GRAIN_MARKER.size:
            raise FormatError(f"{where} {PAST}")
        lba, size = GRAIN_MARKER.unpack_from(data)
        sector = (extent.unit_start - sparse.start) // SECTOR
        if lba not in (sector, extent.unit_start // SECTOR):
            raise FormatError(f"{where} is marked for sector {lba}, not {sector}")
        if size == 0:
            raise FormatError(f"{where} is a metadata marker, not a grain")
        if GRAIN_MARKER.size + size > len(data):
            at_end = extent.file == 0 and extent.offset + len(data) >= self._size
            past = len(data) < extent.stored_length or at_end
            raise FormatError(f"{where} of {size} bytes {PAST if past else 'is too large'}")
        stream = data[GRAIN_MARKER.size : GRAIN_MARKER.size + size]
        unit = _inflate(where, stream, sparse.header.grain)
        if len(unit) == extent.unit_length:
            return unit
        if len(unit) == sparse.header.grain > extent.unit_length:  # a last grain stored whole
            return unit[: extent.unit_length]
        raise FormatError(f"{where} inflates to {len(unit)} bytes, not {extent.unit_length}")


def _inflate(where: str, stream: bytes, limit: int) -> bytes:
    """The zlib (RFC 1950) stream inflated; FormatError past `limit` bytes or when it does
    not end (checksum included) within `stream`."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(stream, limit)
        more = not inflater.eof and inflater.decompress(inflater.unconsumed_tail, 1)
    except zlib.error as exc:
        raise FormatError(f"{where} does not inflate ({exc})") from None
    if more:
        raise FormatError(f"{where} inflates past the grain size ({limit} bytes)")
    if not inflater.eof:
        raise FormatError(f"{where} ends inside its deflate stream")
    return out


def _deflate_bound(length: int) -> int:
    """The most any deflate compressor's zlib stream of `length` bytes takes (zlib's
    deflateBound for any settings, with margin)."""
    return length + (length >> 3) + (length >> 6) + 64


def _entries(data: bytes) -> "array[int]":
    entries = array("I", data[: len(data) - len(data) % GTE])  # uint32, little-endian
    if sys.byteorder == "big":
        entries.byteswap()
    return entries


def _gt_spans(grain: int, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """For relative bytes `[lo, hi)`: (grain table, first entry, last entry) of each table."""
    g0, g1 = lo // grain, (hi - 1) // grain
    for gt in range(g0 // GTES_PER_GT, g1 // GTES_PER_GT + 1):
        base = gt * GTES_PER_GT
        yield gt, max(g0, base) - base, min(g1, base + GTES_PER_GT - 1) - base


def _overlap(a: int, b: int, c: int, d: int) -> bool:
    return a < d and c < b


def _append(out: list[Extent], extent: Extent) -> None:
    """Add `extent`, merged into the last one when they are one run."""
    if out and _joins(out[-1], extent):
        out[-1] = replace(out[-1], length=out[-1].length + extent.length)
    else:
        out.append(extent)


def _joins(a: Extent, b: Extent) -> bool:
    if a.kind is not b.kind or a.start + a.length != b.start or a.kind is Kind.COMPRESSED:
        return False
    return a.kind is not Kind.DATA or (a.file == b.file and a.offset + a.length == b.offset)
