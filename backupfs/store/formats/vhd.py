"""VHD (Microsoft Virtual Hard Disk, Virtual PC's "conectix" format): probe and table reader.

Holds the footer (the last 512 bytes; the 511-byte footer of old Virtual PC versions is
accepted), the dynamic disk header ("cxsparse"), its BAT (big-endian uint32 sector numbers)
and the parent locators, and maps virtual ranges for the three disk types:

- fixed (2): the virtual disk is the file's first `current size` bytes;
- dynamic (3): an unallocated block (BAT entry 0xFFFFFFFF) is zeros; an allocated block is
  data throughout. Its sector bitmap is not consulted, as qemu does (it writes the bitmap
  all ones and never reads it), so this reads what `qemu-img convert` outputs;
- differencing (4): an unallocated block is the parent's; in an allocated block the sector
  bitmap (most significant bit first) says per 512-byte sector whether it is this file's
  data (set) or the parent's (clear).

The virtual size is the footer's `current size` (what qemu reads with `force_size=on`, and
what Hyper-V uses), not the CHS geometry. The parent is named by the dynamic header's
locators, in this order: `W2ru` (relative, UTF-16LE, backslashes made slashes), `W2ku`
(absolute, UTF-16LE), `MacX` (a UTF-8 file URL), then the parent's unicode name.

Also holds what the VHDX reader shares: `BlockLayer` (open reads and their handlers, range
checks, walking a range by block), extent merging and bitmap runs.

Refused (FormatError, one line naming the file): no footer, a bad footer or dynamic header
checksum, a format version other than 1.x, a disk type other than 2, 3 or 4, a virtual size
that is not whole sectors or beyond 2040 GiB or (fixed) beyond the file, a block size not a
power of two from 512 bytes to 256 MiB, a BAT too small for the disk, larger than 32 MiB,
past the end of the file or over the headers, a BAT entry whose block lies past the file or
over the headers or the BAT, and parent locators past the file or longer than 64 KiB.
"""

import struct
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import NoReturn

from backupfs.errors import FormatError
from backupfs.store.formats.base import MAX_OPEN_BYTES, Extent, Kind, ParentRef, TableRead

FORMAT = "vhd"

SECTOR = 512
COOKIE = b"conectix"
SPARSE_COOKIE = b"cxsparse"
FOOTER_SIZE = 512
OLD_FOOTER_SIZE = 511  # Virtual PC before 2004 wrote the footer without its last byte
HEADER_SIZE = 1024  # the dynamic disk header
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
UNALLOCATED = 0xFFFFFFFF
MAX_VIRTUAL_SIZE = 0xFF000000 * SECTOR  # 2040 GiB, the format's limit
MAX_BLOCK_SIZE = 256 << 20
MAX_BAT_BYTES = MAX_OPEN_BYTES // 2
MAX_LOCATOR = 64 << 10  # a Windows path of 32 Ki UTF-16 units
LOCATOR_CODES = (b"W2ru", b"W2ku", b"MacX")  # in the order they are preferred
LOCATORS_AT, LOCATOR_ENTRY, LOCATOR_COUNT = 576, 24, 8

Handler = Callable[[TableRead, bytes], None]


def probe(head: bytes, tail: bytes, file_size: int) -> bool:
    """A VHD: the footer's cookie in the last 512 (or, old, 511) bytes, or a dynamic
    disk's footer copy at offset 0 (then the layer says what is wrong with the end)."""
    if head[:8] == COOKIE:
        return True
    return any(len(tail) >= n and tail[-n:][:8] == COOKIE for n in (FOOTER_SIZE, OLD_FOOTER_SIZE))


def checksum(data: bytes, field: int) -> int:
    """One's complement of the sum of the bytes, the 4-byte field at `field` excluded."""
    return ~(sum(data) - sum(data[field : field + 4])) & 0xFFFFFFFF


def ceil_div(value: int, unit: int) -> int:
    return -(-value // unit)


def round_up(value: int, unit: int) -> int:
    return ceil_div(value, unit) * unit


def append_extent(out: list[Extent], extent: Extent) -> None:
    """Append `extent` to `out`, merged with the last one when it continues it."""
    if out:
        last = out[-1]
        if (
            last.kind is extent.kind
            and last.start + last.length == extent.start
            and (extent.kind is not Kind.DATA or last.offset + last.length == extent.offset)
        ):
            out[-1] = Extent(last.start, last.length + extent.length, last.kind, 0, last.offset)
            return
    out.append(extent)


def bit_runs(
    bits: bytes, first: int, count: int, *, msb_first: bool
) -> Iterator[tuple[int, int, bool]]:
    """Runs (first bit, bits, set) of bits [first, first + count) of a bitmap whose bit 0
    is the most (VHD) or least (VHDX) significant bit of byte 0."""
    position, end = first, first + count
    run_start, run_value = first, None
    while position < end:
        byte = bits[position >> 3]
        if position & 7 == 0 and end - position >= 8 and byte in (0, 0xFF):
            value, step = byte == 0xFF, 8
        else:
            shift = 7 - (position & 7) if msb_first else position & 7
            value, step = bool(byte >> shift & 1), 1
        if value != run_value:
            if run_value is not None:
                yield run_start, position - run_start, run_value
            run_start, run_value = position, value
        position += step
    if run_value is not None:
        yield run_start, end - run_start, run_value


class BlockLayer:
    """What the VHD and VHDX layers share: open reads asked with a handler each, and a step
    to take once a round's reads are all in; range checks; walking a range by block."""

    format = ""

    def __init__(self, name: str, file_size: int) -> None:
        self.name = name
        self.file_size = file_size
        self.virtual_size = 0
        self.block_size = 0
        self.parent: ParentRef | None = None
        self.files: list[str] = []
        self.unique_id = ""  # this file's id, as a child's `parent.uuid` names its parent
        self._pending: dict[TableRead, list[Handler]] = {}
        self._next: Callable[[], None] | None = None
        self._open = False

    def open_reads(self) -> list[TableRead]:
        return list(self._pending)

    def load(self, read: TableRead, data: bytes) -> None:
        handlers = self._pending.pop(read, None)
        if handlers is None:
            raise ValueError(f"{self.name}: {self.format} did not ask for {read}")
        if len(data) < read.length:
            self._refuse(f"file ends inside the table at offset {read.offset}")
        for handler in handlers:
            handler(read, data)
        while not self._pending and self._next is not None:
            step, self._next = self._next, None
            step()

    def decompress(self, extent: Extent, data: bytes) -> bytes:
        self._refuse("has no compressed data")

    def _ask(self, read: TableRead, handler: Handler) -> None:
        self._pending.setdefault(read, []).append(handler)

    def _refuse(self, reason: str) -> NoReturn:
        raise FormatError(f"{self.name}: {self.format} {reason}")

    def _finish(self) -> None:
        self._open = True

    def _check_range(self, start: int, end: int) -> None:
        if not self._open:
            raise ValueError(f"{self.name}: {self.format} is not open yet")
        if not 0 <= start <= end <= self.virtual_size:
            raise ValueError(f"{self.name}: [{start}, {end}) is not within the virtual disk")

    def _blocks(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(block index, virtual start, virtual end) of the blocks covering [start, end)."""
        position = start
        while position < end:
            index = position // self.block_size
            stop = min(end, (index + 1) * self.block_size)
            yield index, position, stop
            position = stop


class VhdLayer(BlockLayer):
    """One VHD file (fixed, dynamic or differencing); see the module's docstring."""

    format = FORMAT

    def __init__(self, name: str, file_size: int) -> None:
        super().__init__(name, file_size)
        self.disk_type = 0  # unique_id: the footer's unique id, in hex
        self.bitmap_size = 0
        self._data_end = 0  # where the footer begins
        self._bat = b""
        self._reserved: list[tuple[int, int]] = []  # footer copy, header, BAT: no block there
        self._locators: dict[int, tuple[bytes, str]] = {}  # by entry: (platform code, path)
        self._parent_name = ""
        self._parent_uuid = ""
        if file_size < OLD_FOOTER_SIZE:
            self._refuse(f"file of {file_size} bytes is too small for a footer")
        tail = min(file_size, FOOTER_SIZE + HEADER_SIZE)
        self._ask(TableRead(0, file_size - tail, tail), self._load_footer)

    # -- opening

    def _load_footer(self, read: TableRead, data: bytes) -> None:
        footer = self._find_footer(data)
        if checksum(footer, 64) != struct.unpack_from(">I", footer, 64)[0]:
            self._refuse("footer checksum does not match")
        (version,) = struct.unpack_from(">I", footer, 12)
        if version >> 16 != 1:
            self._refuse(f"footer version {version:#x} is not 1.x")
        (data_offset,) = struct.unpack_from(">Q", footer, 16)
        (size,) = struct.unpack_from(">Q", footer, 48)
        (self.disk_type,) = struct.unpack_from(">I", footer, 60)
        self.unique_id = footer[68:84].hex()
        if self.disk_type not in (FIXED, DYNAMIC, DIFFERENCING):
            self._refuse(f"disk type {self.disk_type} is not fixed, dynamic or differencing")
        if size % SECTOR or size > MAX_VIRTUAL_SIZE:
            self._refuse(f"virtual size {size} is absurd (whole sectors, at most 2040 GiB)")
        self.virtual_size = size
        if self.disk_type == FIXED:
            if size > self._data_end:
                self._refuse(f"fixed disk of {size} bytes is larger than the file")
            self._next = self._finish
            return
        if data_offset < FOOTER_SIZE or data_offset > self._data_end - HEADER_SIZE:
            self._refuse(f"dynamic header at offset {data_offset} is outside the file")
        self._reserved = [(0, FOOTER_SIZE), (data_offset, data_offset + HEADER_SIZE)]
        self._ask(TableRead(0, data_offset, HEADER_SIZE), self._load_header)

    def _find_footer(self, tail: bytes) -> bytes:
        """The footer at the end of `tail` (the file's last bytes), padded to 512 bytes."""
        for size in (FOOTER_SIZE, OLD_FOOTER_SIZE):
            footer = tail[-size:]
            if len(footer) == size and footer[:8] == COOKIE:
                self._data_end = self.file_size - size
                return footer + bytes(FOOTER_SIZE - size)
        self._refuse("has no footer (cookie 'conectix') in its last 512 bytes")

    def _load_header(self, read: TableRead, header: bytes) -> None:
        if header[:8] != SPARSE_COOKIE:
            self._refuse(f"dynamic header at offset {read.offset} lacks its cookie 'cxsparse'")
        if checksum(header, 36) != struct.unpack_from(">I", header, 36)[0]:
            self._refuse("dynamic header checksum does not match")
        table_offset, version, entries, block_size = struct.unpack_from(">QIII", header, 16)
        if version >> 16 != 1:
            self._refuse(f"dynamic header version {version:#x} is not 1.x")
        if block_size & (block_size - 1) or not SECTOR <= block_size <= MAX_BLOCK_SIZE:
            self._refuse(f"block size {block_size} is not a power of two from 512 B to 256 MiB")
        self.block_size = block_size
        self.bitmap_size = round_up(block_size // SECTOR // 8, SECTOR)
        self._ask_bat(table_offset, entries)
        if self.disk_type == DIFFERENCING:
            self._parent_uuid = header[40:56].hex()
            self._parent_name = _parent_name(header[64:576])
            for index in range(LOCATOR_COUNT):
                self._ask_locator(header, index)
        self._next = self._finish

    def _ask_bat(self, table_offset: int, entries: int) -> None:
        blocks = ceil_div(self.virtual_size, self.block_size)
        if entries < blocks:
            self._refuse(f"BAT has {entries} entries, the disk needs {blocks}")
        length = blocks * 4
        if length > MAX_BAT_BYTES:
            self._refuse(f"BAT of {length} bytes is larger than {MAX_BAT_BYTES >> 20} MiB")
        if table_offset + length > self._data_end:
            self._refuse(f"BAT at offset {table_offset} runs past the end of the file")
        if any(table_offset < hi and lo < table_offset + length for lo, hi in self._reserved):
            self._refuse(f"BAT at offset {table_offset} overlaps the footer copy or header")
        self._reserved.append((table_offset, table_offset + length))
        if length:
            self._ask(TableRead(0, table_offset, length), self._load_bat)

    def _load_bat(self, read: TableRead, data: bytes) -> None:
        self._bat = data

    def _ask_locator(self, header: bytes, index: int) -> None:
        at = LOCATORS_AT + index * LOCATOR_ENTRY
        code, _space, length, _reserved, offset = struct.unpack_from(">4sIIIQ", header, at)
        if code not in LOCATOR_CODES or length == 0:
            return
        name = code.decode()
        if length > MAX_LOCATOR:
            self._refuse(f"parent locator {name} of {length} bytes is absurd")
        if offset + length > self._data_end:
            self._refuse(f"parent locator {name} at offset {offset} is past the end of the file")
        self._ask(TableRead(0, offset, length), partial(self._load_locator, index, code))

    def _load_locator(self, index: int, code: bytes, read: TableRead, data: bytes) -> None:
        what = f"parent locator {code.decode()}"
        if code == b"MacX":
            path = _file_url_path(self._decode(data, "utf-8", what))
        elif code == b"W2ru":
            path = self._decode(data, "utf-16-le", what).replace("\\", "/")
        else:
            path = self._decode(data, "utf-16-le", what)
        self._locators[index] = (code, path)

    def _decode(self, data: bytes, encoding: str, what: str) -> str:
        try:
            return data.decode(encoding).split("\0", 1)[0]
        except UnicodeDecodeError:
            self._refuse(f"{what} is not valid {encoding}")

    def _finish(self) -> None:
        if self.disk_type == DIFFERENCING:
            found = [self._locators[index] for index in sorted(self._locators)]
            paths = [p for code in LOCATOR_CODES for c, p in found if c == code and p]
            path = next(iter([*paths, self._parent_name]), "")
            if not path:
                self._refuse("differencing disk names no parent (no locator, no parent name)")
            self.parent = ParentRef(path=path, uuid=self._parent_uuid)
        super()._finish()

    # -- mapping

    def table_reads(self, start: int, end: int) -> list[TableRead]:
        self._check_range(start, end)
        if self.disk_type != DIFFERENCING:
            return []
        reads = []
        for index, lo, hi in self._blocks(start, end):
            block = self._block_start(index)
            if block is not None:
                reads.append(self._bitmap_read(index, block, lo, hi))
        return reads

    def map(self, start: int, end: int, tables: Mapping[TableRead, bytes]) -> list[Extent]:
        self._check_range(start, end)
        if self.disk_type == FIXED:
            return [Extent(start, end - start, Kind.DATA, 0, start)] if end > start else []
        out: list[Extent] = []
        for index, lo, hi in self._blocks(start, end):
            block = self._block_start(index)
            if block is None:
                kind = Kind.PARENT if self.disk_type == DIFFERENCING else Kind.ZERO
                append_extent(out, Extent(lo, hi - lo, kind))
            elif self.disk_type == DYNAMIC:
                data = block + self.bitmap_size + lo - index * self.block_size
                append_extent(out, Extent(lo, hi - lo, Kind.DATA, 0, data))
            else:
                self._map_sectors(out, index, block, lo, hi, tables)
        return out

    def _block_start(self, index: int) -> int | None:
        """Where block `index` (its sector bitmap) begins in the file; None: unallocated."""
        entry: int = struct.unpack_from(">I", self._bat, index * 4)[0]
        if entry == UNALLOCATED:
            return None
        start = entry * SECTOR
        used = self.bitmap_size + min(self.block_size, self.virtual_size - index * self.block_size)
        if start + used > self._data_end:
            self._refuse(f"BAT entry {index} points past the end of the file")
        if any(start < hi and lo < start + used for lo, hi in self._reserved):
            self._refuse(f"BAT entry {index} points into the headers or the BAT")
        return start

    def _bitmap_read(self, index: int, block: int, lo: int, hi: int) -> TableRead:
        """The 512-byte aligned piece of block `index`'s sector bitmap for [lo, hi)."""
        base = index * self.block_size
        first, last = (lo - base) // SECTOR, ceil_div(hi - base, SECTOR)
        begin = first // 8 // SECTOR * SECTOR
        finish = min(round_up(ceil_div(last, 8), SECTOR), self.bitmap_size)
        return TableRead(0, block + begin, finish - begin)

    def _map_sectors(
        self,
        out: list[Extent],
        index: int,
        block: int,
        lo: int,
        hi: int,
        tables: Mapping[TableRead, bytes],
    ) -> None:
        """[lo, hi) of allocated differencing block `index`, sector by its bitmap bit."""
        read = self._bitmap_read(index, block, lo, hi)
        bits = tables.get(read)
        if bits is None:
            raise ValueError(f"{self.name}: vhd was not given its table {read}")
        if len(bits) < read.length:
            self._refuse(f"sector bitmap of block {index} is cut short by the end of the file")
        base = index * self.block_size
        skip = (read.offset - block) * 8  # bits before the piece that was read
        first, last = (lo - base) // SECTOR, ceil_div(hi - base, SECTOR)
        for bit, count, present in bit_runs(bits, first - skip, last - first, msb_first=True):
            run_lo = max(lo, base + (bit + skip) * SECTOR)
            run_hi = min(hi, base + (bit + skip + count) * SECTOR)
            if present:
                data = block + self.bitmap_size + run_lo - base
                append_extent(out, Extent(run_lo, run_hi - run_lo, Kind.DATA, 0, data))
            else:
                append_extent(out, Extent(run_lo, run_hi - run_lo, Kind.PARENT))


def _file_url_path(url: str) -> str:
    """The path of a MacX locator's `file://` URL ("" for any other kind of URL)."""
    if not url.startswith("file://"):
        return ""
    path = url[len("file://") :]
    if path.startswith("localhost/"):
        path = path[len("localhost") :]
    return urllib.parse.unquote(path)


def _parent_name(field: bytes) -> str:
    """The dynamic header's parent unicode name (UTF-16BE); "" if it is not valid text:
    only a fallback for when no locator names the parent."""
    try:
        return field.decode("utf-16-be").split("\0", 1)[0]
    except UnicodeDecodeError:
        return ""
