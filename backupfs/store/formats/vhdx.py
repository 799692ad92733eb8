"""VHDX (Hyper-V's Virtual Hard Disk v2, [MS-VHDX]): probe and table reader.

Holds the header section (file identifier "vhdxfile"; of the two headers at 64 and 128 KiB
the valid one with the higher sequence number; the region table at 192 KiB, or its copy at
256 KiB), the metadata (file parameters, virtual disk size, logical and physical sector
size, page 83 data, parent locator) and the BAT, and maps virtual ranges by payload block
state:

- NOT_PRESENT (0): the parent's in a differencing file, zeros otherwise;
- UNDEFINED (1), ZERO (2), UNMAPPED (3, and 5: its value in the 0.95 draft, as qemu): zeros;
- FULLY_PRESENT (6): data at the entry's offset;
- PARTIALLY_PRESENT (7, differencing files only): per logical sector, this file's data where
  the chunk's sector bitmap block (1 MiB, bit 0 of byte 0 first) has the bit set, the
  parent's where it is clear.

BAT entries are payload entries interleaved with a sector bitmap entry after every chunk
ratio (2^23 * logical sector size / block size) of them. The parent is named by the VHDX
parent locator: `relative_path` (backslashes made slashes), else `absolute_win32_path`, else
`volume_path`; its `uuid` is `parent_linkage` (the parent's data write GUID), lowercase
without braces, as `unique_id` of the parent's layer.

Refused (FormatError, one line naming the file): no file identifier; no valid header (CRC-32C,
signature, version 1); a log to replay; no valid region table; regions out of the file,
unaligned or overlapping; an unknown required region or metadata item; missing, duplicate or
short metadata items, or items past their region; a block size not a power of two from 1 to
256 MiB; sector sizes other than 512 or 4096; a virtual size not whole sectors or beyond
64 TiB; a BAT larger than its region or than 32 MiB; BAT entries with reserved states, or
pointing past the file or into the headers, log, BAT or metadata; a partially present block
outside a differencing file or without its sector bitmap; an unusable parent locator.
"""

import struct
import uuid
from collections.abc import Mapping
from functools import partial

from backupfs.store.formats.base import MAX_OPEN_BYTES, Extent, Kind, ParentRef, TableRead
from backupfs.store.formats.crc32c import crc32c
from backupfs.store.formats.vhd import BlockLayer, append_extent, bit_runs, ceil_div, round_up

FORMAT = "vhdx"

KIB, MIB = 1 << 10, 1 << 20
SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KIB, 128 * KIB)
HEADER_SIZE = 4 * KIB  # what a header's CRC covers
REGION_TABLE_OFFSETS = (192 * KIB, 256 * KIB)
TABLE_SIZE = 64 * KIB  # region table, metadata table
HEADER_SECTION = MIB
MAX_REGIONS = 2047
MAX_ITEM = MIB
MAX_VIRTUAL_SIZE = 64 << 40
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = MIB, 256 * MIB
SECTOR_SIZES = (512, 4096)
SECTORS_PER_CHUNK = 1 << 23
BITMAP_BLOCK = MIB
MAX_BAT_BYTES = MAX_OPEN_BYTES // 2
PIECE = 512  # sector bitmaps are read in 512-byte aligned pieces

NOT_PRESENT, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 6, 7
ZERO_STATES = (1, 2, 3, 5)  # UNDEFINED, ZERO, UNMAPPED, UNMAPPED of the 0.95 draft
SB_PRESENT = 6


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_REGION = _guid("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_REGION = _guid("8b7ca206-4790-4b9a-b8fe-575f050f886e")
FILE_PARAMETERS = _guid("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE = _guid("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
PAGE_83_DATA = _guid("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR_SIZE = _guid("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR_SIZE = _guid("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR = _guid("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
VHDX_PARENT_TYPE = _guid("b04aefb7-d19e-4a81-b789-25b8e9445913")
ITEMS = {  # the known metadata items: name, and the bytes of it that are read (0: all)
    FILE_PARAMETERS: ("file parameters", 8),
    VIRTUAL_DISK_SIZE: ("virtual disk size", 8),
    PAGE_83_DATA: ("page 83 data", 16),
    LOGICAL_SECTOR_SIZE: ("logical sector size", 4),
    PHYSICAL_SECTOR_SIZE: ("physical sector size", 4),
    PARENT_LOCATOR: ("parent locator", 0),
}
PATH_KEYS = ("relative_path", "absolute_win32_path", "volume_path")  # in order of preference


def probe(head: bytes, tail: bytes, file_size: int) -> bool:
    """A VHDX: the file identifier's signature at offset 0."""
    return head[:8] == SIGNATURE


def checksum_ok(data: bytes) -> bool:
    """The CRC-32C at bytes 4..8 of `data` is that of `data` with those bytes zeroed."""
    stored: int = struct.unpack_from("<I", data, 4)[0]
    return crc32c(data[:4] + bytes(4) + data[8:]) == stored


def guid_text(raw: bytes) -> str:
    """A GUID as stored (Microsoft's mixed-endian bytes), as lowercase text."""
    return str(uuid.UUID(bytes_le=raw))


class VhdxLayer(BlockLayer):
    """One VHDX file (fixed, dynamic or differencing); see the module's docstring."""

    format = FORMAT

    def __init__(self, name: str, file_size: int) -> None:
        super().__init__(name, file_size)  # unique_id: the data write GUID
        self.sector_size = 0
        self.physical_sector_size = 0
        self.chunk_ratio = 0
        self.has_parent = False
        self._regions: list[tuple[int, int]] = []  # header section, log, BAT, metadata
        self._bat_offset = self._bat_length = 0
        self._metadata_offset = self._metadata_length = 0
        self._items: dict[bytes, bytes] = {}
        self._bat = b""
        if file_size < HEADER_SECTION:
            self._refuse(f"file of {file_size} bytes is smaller than the 1 MiB header section")
        self._ask(TableRead(0, 0, REGION_TABLE_OFFSETS[1] + TABLE_SIZE), self._load_head)

    # -- opening

    def _load_head(self, read: TableRead, head: bytes) -> None:
        if head[:8] != SIGNATURE:
            self._refuse("lacks its file identifier 'vhdxfile'")
        header = self._current_header(head)
        if any(header[48:64]):
            self._refuse(
                "log needs replaying: open the image once with Hyper-V, "
                "or run `qemu-img check -r all` on it"
            )
        self.unique_id = guid_text(header[32:48])
        self._regions = [(0, HEADER_SECTION)]
        log_length, log_offset = struct.unpack_from("<IQ", header, 68)
        if log_length:
            self._add_region("log", log_offset, log_length)
        self._read_region_table(self._region_table(head))
        self._ask(TableRead(0, self._metadata_offset, TABLE_SIZE), self._load_metadata_table)

    def _current_header(self, head: bytes) -> bytes:
        """The valid header with the higher sequence number."""
        valid = []
        for offset in HEADER_OFFSETS:
            header = head[offset : offset + HEADER_SIZE]
            version = struct.unpack_from("<H", header, 66)[0]
            if header[:4] == b"head" and version == 1 and checksum_ok(header):
                valid.append((struct.unpack_from("<Q", header, 8)[0], header))
        if not valid:
            self._refuse("has no valid header (signature, version 1, CRC-32C)")
        if len(valid) == 2 and valid[0][0] == valid[1][0] and valid[0][1] != valid[1][1]:
            self._refuse(f"has two different headers of sequence number {valid[0][0]}")
        return max(valid)[1]

    def _region_table(self, head: bytes) -> bytes:
        for offset in REGION_TABLE_OFFSETS:
            table = head[offset : offset + TABLE_SIZE]
            if table[:4] == b"regi" and checksum_ok(table):
                return table
        self._refuse("has no valid region table (signature, CRC-32C), nor copy")

    def _read_region_table(self, table: bytes) -> None:
        (count,) = struct.unpack_from("<I", table, 8)
        if count > MAX_REGIONS:
            self._refuse(f"region table has {count} entries (at most {MAX_REGIONS})")
        found: dict[bytes, tuple[int, int]] = {}
        for index in range(count):
            at = 16 + 32 * index
            guid = table[at : at + 16]
            offset, length, flags = struct.unpack_from("<QII", table, at + 16)
            if guid not in (BAT_REGION, METADATA_REGION):
                if flags & 1:
                    self._refuse(f"region {guid_text(guid)} is required and unknown")
                continue
            if guid in found:
                self._refuse(f"region table has two entries for region {guid_text(guid)}")
            what = "BAT region" if guid == BAT_REGION else "metadata region"
            self._add_region(what, offset, length)
            found[guid] = (offset, length)
        if len(found) < 2:
            self._refuse("region table lacks the BAT or the metadata region")
        self._bat_offset, self._bat_length = found[BAT_REGION]
        self._metadata_offset, self._metadata_length = found[METADATA_REGION]

    def _add_region(self, what: str, offset: int, length: int) -> None:
        if offset % MIB or length % MIB or offset < HEADER_SECTION or length == 0:
            self._refuse(f"{what} at offset {offset} of {length} bytes is not 1 MiB aligned")
        if offset + length > self.file_size:
            self._refuse(f"{what} at offset {offset} of {length} bytes is past the end of the file")
        if any(offset < hi and lo < offset + length for lo, hi in self._regions):
            self._refuse(f"{what} at offset {offset} overlaps another region")
        self._regions.append((offset, offset + length))

    def _load_metadata_table(self, read: TableRead, table: bytes) -> None:
        if table[:8] != b"metadata":
            self._refuse("metadata table lacks its signature 'metadata'")
        (count,) = struct.unpack_from("<H", table, 10)
        if count > MAX_REGIONS:
            self._refuse(f"metadata table has {count} entries (at most {MAX_REGIONS})")
        places: dict[bytes, tuple[int, int]] = {}
        for index in range(count):
            at = 32 + 32 * index
            guid = table[at : at + 16]
            offset, length, flags = struct.unpack_from("<III", table, at + 16)
            if guid not in ITEMS or flags & 1:  # unknown, or a user item
                if flags & 4:
                    self._refuse(f"metadata item {guid_text(guid)} is required and unknown")
                continue
            name = ITEMS[guid][0]
            if guid in places:
                self._refuse(f"metadata table has two {name} items")
            if length > MAX_ITEM or (length and offset < TABLE_SIZE):
                self._refuse(f"metadata item {name} at {offset} of {length} bytes is absurd")
            if offset + length > self._metadata_length:
                self._refuse(f"metadata item {name} at {offset} is past its region")
            places[guid] = (offset, length)
        for guid, (name, size) in ITEMS.items():
            offset, length = places.get(guid, (0, 0))
            if length < size:
                self._refuse(f"metadata lacks its {name} item (or it is short)")
            if guid != PAGE_83_DATA and length:  # page 83 data: required, not used
                self._ask_item(guid, offset, size or length)
        self._next = self._read_items

    def _ask_item(self, guid: bytes, offset: int, length: int) -> None:
        read = TableRead(0, self._metadata_offset + offset, length)
        self._ask(read, partial(self._load_item, guid))

    def _load_item(self, guid: bytes, read: TableRead, data: bytes) -> None:
        self._items[guid] = data

    def _read_items(self) -> None:
        block_size, bits = struct.unpack_from("<II", self._items[FILE_PARAMETERS])
        if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            self._refuse(f"block size {block_size} is not a power of two from 1 to 256 MiB")
        self.block_size, self.has_parent = block_size, bool(bits & 2)
        (self.sector_size,) = struct.unpack_from("<I", self._items[LOGICAL_SECTOR_SIZE])
        (self.physical_sector_size,) = struct.unpack_from("<I", self._items[PHYSICAL_SECTOR_SIZE])
        if self.sector_size not in SECTOR_SIZES or self.physical_sector_size not in SECTOR_SIZES:
            self._refuse(
                f"sector sizes {self.sector_size}/{self.physical_sector_size} are not 512 or 4096"
            )
        (size,) = struct.unpack_from("<Q", self._items[VIRTUAL_DISK_SIZE])
        if size % self.sector_size or size > MAX_VIRTUAL_SIZE:
            self._refuse(f"virtual size {size} is absurd (whole sectors, at most 64 TiB)")
        self.virtual_size = size
        self.chunk_ratio = SECTORS_PER_CHUNK * self.sector_size // block_size
        if self.has_parent:
            if PARENT_LOCATOR not in self._items:
                self._refuse("is a differencing file without a parent locator")
            self.parent = self._parent_ref(self._items[PARENT_LOCATOR])
        self._ask_bat()
        self._next = self._finish

    def _ask_bat(self) -> None:
        blocks = ceil_div(self.virtual_size, self.block_size)
        if self.has_parent:
            entries = ceil_div(blocks, self.chunk_ratio) * (self.chunk_ratio + 1)
        else:
            entries = blocks + max(blocks - 1, 0) // self.chunk_ratio
        length = entries * 8
        if length > MAX_BAT_BYTES:
            self._refuse(f"BAT of {length} bytes is larger than {MAX_BAT_BYTES >> 20} MiB")
        if length > self._bat_length:
            self._refuse(f"BAT region of {self._bat_length} bytes is too small for the disk")
        if length:
            self._ask(TableRead(0, self._bat_offset, length), self._load_bat)

    def _load_bat(self, read: TableRead, data: bytes) -> None:
        self._bat = data

    def _parent_ref(self, item: bytes) -> ParentRef:
        entries = self._locator_entries(item)
        linkage = entries.get("parent_linkage")
        if linkage is None:
            self._refuse("parent locator lacks parent_linkage")
        try:
            parent_uuid = str(uuid.UUID(linkage.strip("{}")))
        except ValueError:
            self._refuse(f"parent_linkage {linkage[:40]!r} is not a GUID")
        path = next((entries[key] for key in PATH_KEYS if entries.get(key)), "")
        if not path:
            self._refuse("parent locator has no relative_path, absolute_win32_path, volume_path")
        if path == entries.get("relative_path"):
            path = path.replace("\\", "/")
        return ParentRef(path=path, uuid=parent_uuid)

    def _locator_entries(self, item: bytes) -> dict[str, str]:
        """The parent locator's key/value pairs (the first of each key)."""
        if len(item) < 20 or item[:16] != VHDX_PARENT_TYPE:
            self._refuse("parent locator is not of the VHDX type")
        (count,) = struct.unpack_from("<H", item, 18)
        if 20 + 12 * count > len(item):
            self._refuse(f"parent locator's {count} entries run past its item")
        entries: dict[str, str] = {}
        for index in range(count):
            key_at, value_at, key_length, value_length = struct.unpack_from(
                "<IIHH", item, 20 + 12 * index
            )
            key = self._locator_text(item, key_at, key_length)
            entries.setdefault(key, self._locator_text(item, value_at, value_length))
        return entries

    def _locator_text(self, item: bytes, offset: int, length: int) -> str:
        if offset == 0 or length == 0 or offset + length > len(item):
            self._refuse(f"parent locator entry at {offset} of {length} bytes is past its item")
        try:
            return item[offset : offset + length].decode("utf-16-le")
        except UnicodeDecodeError:
            self._refuse(f"parent locator entry at {offset} is not UTF-16")

    # -- mapping

    def table_reads(self, start: int, end: int) -> list[TableRead]:
        self._check_range(start, end)
        reads: dict[TableRead, None] = {}
        for index, lo, hi in self._blocks(start, end):
            if self._entry(self._payload_index(index)) & 7 == PARTIALLY_PRESENT:
                reads[self._bitmap_read(index, lo, hi)] = None
        return list(reads)

    def map(self, start: int, end: int, tables: Mapping[TableRead, bytes]) -> list[Extent]:
        self._check_range(start, end)
        out: list[Extent] = []
        for index, lo, hi in self._blocks(start, end):
            entry = self._entry(self._payload_index(index))
            state = entry & 7
            if state == NOT_PRESENT:
                append_extent(
                    out, Extent(lo, hi - lo, Kind.PARENT if self.has_parent else Kind.ZERO)
                )
            elif state in ZERO_STATES:
                append_extent(out, Extent(lo, hi - lo, Kind.ZERO))
            elif state == FULLY_PRESENT:
                data = self._payload_offset(index, entry) + lo - index * self.block_size
                append_extent(out, Extent(lo, hi - lo, Kind.DATA, 0, data))
            elif state == PARTIALLY_PRESENT:
                self._map_sectors(out, index, entry, lo, hi, tables)
            else:
                self._refuse(f"BAT entry of block {index} has the reserved state {state}")
        return out

    def _payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def _entry(self, index: int) -> int:
        value: int = struct.unpack_from("<Q", self._bat, index * 8)[0]
        return value

    def _checked_offset(self, what: str, entry: int, length: int) -> int:
        """The file offset of a BAT entry's block, whose first `length` bytes are used."""
        offset = entry >> 20 << 20
        if offset + length > self.file_size:
            self._refuse(f"BAT entry of {what} points past the end of the file")
        if any(offset < hi and lo < offset + length for lo, hi in self._regions):
            self._refuse(f"BAT entry of {what} points into the headers, log, BAT or metadata")
        return offset

    def _payload_offset(self, index: int, entry: int) -> int:
        used = min(self.block_size, self.virtual_size - index * self.block_size)
        return self._checked_offset(f"block {index}", entry, used)

    def _bitmap_read(self, index: int, lo: int, hi: int) -> TableRead:
        """The 512-byte aligned piece of the sector bitmap for [lo, hi) of block `index`."""
        if not self.has_parent:
            self._refuse(f"block {index} is partially present in a file without a parent")
        chunk = index // self.chunk_ratio
        entry = self._entry(chunk * (self.chunk_ratio + 1) + self.chunk_ratio)
        if entry & 7 != SB_PRESENT:
            self._refuse(f"block {index} is partially present, its sector bitmap is not")
        bitmap = self._checked_offset(f"sector bitmap {chunk}", entry, BITMAP_BLOCK)
        first, last = self._sector_bits(index, lo, hi)
        begin = first // 8 // PIECE * PIECE
        finish = round_up(ceil_div(last, 8), PIECE)
        return TableRead(0, bitmap + begin, finish - begin)

    def _sector_bits(self, index: int, lo: int, hi: int) -> tuple[int, int]:
        """Bits [first, last) of the chunk's sector bitmap for [lo, hi) of block `index`."""
        base = index * self.block_size
        bit0 = (index % self.chunk_ratio) * (self.block_size // self.sector_size)
        return bit0 + (lo - base) // self.sector_size, bit0 + ceil_div(hi - base, self.sector_size)

    def _map_sectors(
        self,
        out: list[Extent],
        index: int,
        entry: int,
        lo: int,
        hi: int,
        tables: Mapping[TableRead, bytes],
    ) -> None:
        """[lo, hi) of partially present block `index`, sector by its bitmap bit."""
        read = self._bitmap_read(index, lo, hi)
        bits = tables.get(read)
        if bits is None:
            raise ValueError(f"{self.name}: vhdx was not given its table {read}")
        if len(bits) < read.length:
            self._refuse(f"sector bitmap of block {index} is cut short by the end of the file")
        data = self._payload_offset(index, entry)
        base, sector = index * self.block_size, self.sector_size
        first, last = self._sector_bits(index, lo, hi)
        skip = (read.offset & (BITMAP_BLOCK - 1)) * 8  # bits before the piece read
        bit0 = first - (lo - base) // sector  # the bit of the block's first sector
        for bit, count, present in bit_runs(bits, first - skip, last - first, msb_first=False):
            run_lo = max(lo, base + (bit + skip - bit0) * sector)
            run_hi = min(hi, base + (bit + skip - bit0 + count) * sector)
            if present:
                append_extent(
                    out, Extent(run_lo, run_hi - run_lo, Kind.DATA, 0, data + run_lo - base)
                )
            else:
                append_extent(out, Extent(run_lo, run_hi - run_lo, Kind.PARENT))
