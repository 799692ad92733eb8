"""The partition table of a disk image, read in userspace through a `read(offset, length)`
function (an image served over HTTP): no sfdisk, no loop device, no root.

Read: an MBR with up to four primary partitions and one extended partition holding a
chain of logical ones (numbered from 5, as Linux numbers them), and a GPT (partition
N is entry N-1 of the array) behind a protective or hybrid MBR. The GPT header's and
the entry array's CRC32s are checked; when the primary GPT is damaged the backup at the
disk's last sector is used, as sfdisk does; both damaged is refused. A disk that holds
no table (no 55 AA signature, a FAT/exFAT/NTFS boot sector, or an MBR that lists no
partition) is returned as one partition numbered 0 covering the whole disk: a bare
filesystem, as `backupfs attach` treats it. The extended container itself is left out,
as attach leaves it out. A valid GPT that lists nothing gives no partitions.

Layouts: libfdisk (util-linux) and the kernel's block/partitions/msdos.c and efi.c.
Where those two read a table differently (two data entries in one extended boot record,
a logical partition of type 0, an EBR without its signature, two extended partitions, a
GPT entry size other than 128), or where it is plainly wrong (partitions past the end of
the disk, overlapping each other or a table sector, a chain that loops or is longer
than the kernel's DISK_MAX_PARTS allows), the table is refused with PartitionTableError
rather than guessed at: every number in it is checked before it is used, the chain is
capped and the GPT entry array is at most MAX_GPT_ARRAY bytes, so that a crafted table
costs a bounded number of small reads and never yields a wrong partition.

Reads: sector 0 with sector 1 (where a GPT header is), then the GPT entry array, or one
sector per extended boot record; the backup GPT only when the primary is not valid.

Not supported: BSD disklabels (inside an MBR partition), Solaris/Sun, SGI, Mac (APM) and
other labels; a GPT without its protective MBR (no 0xEE entry), which neither the kernel
nor libfdisk looks for; partition GUIDs and attributes (not returned). LVM and Windows
dynamic disks (LDM) are volumes inside partitions, listed here as partitions of their
type and read elsewhere (backupfs/attach/lvm.py). Sector sizes 512 to 4096 are read,
but the caller says which: a 4 KiB-sector GPT read with sector_size=512 is refused (no
valid GPT at 512). Messages do not name the image: the caller adds it.
"""

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from backupfs.errors import FormatError

Read = Callable[[int, int], bytes]  # (offset in the image, length) -> bytes

SECTOR_SIZES = (512, 1024, 2048, 4096)
# The kernel's DISK_MAX_PARTS is 256 (numbers up to 255): logical ones are 5 to 255.
MAX_LOGICAL = 251
MAX_GPT_ARRAY = 1 << 20  # bytes of GPT entries read at most: 8192 entries of 128
GPT_ENTRY_SIZE = 128  # what the kernel accepts (and libfdisk assumes)
_GPT_HEADER_MIN = 92
_GPT_SIGNATURE = b"EFI PART"
_MBR_SIGNATURE = b"\x55\xaa"
_MBR_TABLE = 446  # four 16-byte entries, then the signature at 510
_PROTECTIVE = 0xEE
_EXTENDED = frozenset({0x05, 0x0F, 0x85})  # DOS, Windows (LBA) and Linux extended


class PartitionTableError(FormatError):
    """A partition table that is damaged, ambiguous or hostile, refused before use."""


class _BadHeader(PartitionTableError):
    """A GPT header (or its entry array) that is not valid: the other copy may be."""


@dataclass(frozen=True)
class TablePartition:
    number: int  # MBR 1-4 primary, 5.. logical; GPT entry index + 1; 0: the whole disk
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # MBR id in hex as sfdisk prints it ("83", "7"); GPT type GUID; "" whole disk
    name: str = ""  # the GPT partition name; "" on an MBR


@dataclass(frozen=True)
class _Entry:  # one 16-byte MBR (or EBR) entry
    boot: int
    type: int
    start: int  # sectors
    size: int  # sectors


def read_partitions(read: Read, disk_size: int, sector_size: int = 512) -> list[TablePartition]:
    """The partitions of a disk of `disk_size` bytes, in table order; the whole disk as
    partition 0 when it holds no partition table. PartitionTableError on a bad table."""
    if sector_size not in SECTOR_SIZES:
        raise PartitionTableError(f"sector size {sector_size}: not one of {SECTOR_SIZES}")
    sectors = disk_size // sector_size
    if sectors < 1:
        raise PartitionTableError(f"a disk of {disk_size} bytes: smaller than one sector")
    # Sector 0 and, in case it is a GPT's, sector 1 (its header) in one read.
    head = _read(read, 0, min(2, sectors) * sector_size)
    mbr = head[:512]
    if mbr[510:512] != _MBR_SIGNATURE:
        return [_whole(disk_size)]
    entries = _entries(mbr)
    if any(e.type == _PROTECTIVE for e in entries):  # protective or hybrid: the GPT counts
        return _gpt(read, head[sector_size:], sectors, sector_size)
    if any(e.boot not in (0, 0x80) for e in entries) or _boot_sector(mbr):
        return [_whole(disk_size)]  # boot code or a filesystem's boot sector, not a table
    if all(e.size == 0 for e in entries):
        return [_whole(disk_size)]  # an MBR listing nothing: as a FAT boot sector looks
    return _mbr(read, entries, sectors, sector_size)


def _whole(disk_size: int) -> TablePartition:
    return TablePartition(0, 0, disk_size, "")


def _read(read: Read, offset: int, length: int) -> bytes:
    data = read(offset, length)
    if len(data) != length:
        raise PartitionTableError(f"short read: {len(data)} of {length} bytes at {offset}")
    return data


def _entries(sector: bytes) -> list[_Entry]:
    out = []
    for i in range(4):
        boot, _, kind, _, start, size = struct.unpack_from("<B3sB3sII", sector, _MBR_TABLE + 16 * i)
        out.append(_Entry(boot, kind, start, size))
    return out


def _boot_sector(sector: bytes) -> bool:
    """A FAT, exFAT or NTFS boot sector (which ends in 55 AA too), as libblkid finds one."""
    if sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return True
    if sector[0] not in (0xEB, 0xE9):  # the jump over the BIOS parameter block
        return False
    if sector[0x36:0x39] != b"FAT" and sector[0x52:0x57] != b"FAT32":
        return False
    bytes_per_sector = int.from_bytes(sector[11:13], "little")
    return bytes_per_sector in SECTOR_SIZES and sector[16] != 0  # and it has a FAT


# -- MBR -------------------------------------------------------------------------------


def _mbr(read: Read, entries: list[_Entry], sectors: int, ss: int) -> list[TablePartition]:
    primaries: list[tuple[int, int, int, int]] = []  # (number, start, size, type) in sectors
    extended: tuple[int, int, int] | None = None  # (number, start, size)
    for number, e in enumerate(entries, 1):
        if e.size == 0:
            continue  # unused (the kernel and libfdisk skip empty entries, whatever type)
        if e.start + e.size > sectors:
            raise PartitionTableError(
                f"MBR partition {number}: sectors {e.start}+{e.size} past the end of the "
                f"disk ({sectors} sectors)"
            )
        if e.type in _EXTENDED:
            if extended is not None:
                raise PartitionTableError(
                    f"MBR partitions {extended[0]} and {number}: two extended partitions"
                )
            extended = (number, e.start, e.size)
        else:
            primaries.append((number, e.start, e.size, e.type))
    spans = [("the MBR", 0, 1)] + [(f"partition {n}", s, z) for n, s, z, _ in primaries]
    logicals: list[tuple[int, int, int, int]] = []
    if extended is not None:
        number, start, size = extended
        spans.append((f"extended partition {number}", start, size))
        logicals, ebrs = _logicals(read, start, size, ss)
        inner = [(f"the extended boot record at sector {s}", s, 1) for s in ebrs]
        _no_overlap(inner + [(f"partition {n}", s, z) for n, s, z, _ in logicals])
    _no_overlap(spans)
    return [
        TablePartition(n, s * ss, z * ss, format(t, "x")) for n, s, z, t in primaries + logicals
    ]


def _logicals(
    read: Read, ext_start: int, ext_size: int, ss: int
) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """The logical partitions of the extended partition at `ext_start` (sectors), by the
    chain of extended boot records from its first sector; and where those records are.
    Each record's data entry is relative to the record, its link to the next record
    relative to the extended partition."""
    ext_end = ext_start + ext_size
    out: list[tuple[int, int, int, int]] = []
    ebrs: list[int] = []
    seen: set[int] = set()
    ebr: int | None = ext_start
    while ebr is not None:
        if ebr in seen:
            raise PartitionTableError(f"the chain of logical partitions loops at sector {ebr}")
        if len(ebrs) == MAX_LOGICAL:
            raise PartitionTableError(f"more than {MAX_LOGICAL} logical partitions")
        seen.add(ebr)
        ebrs.append(ebr)
        sector = _read(read, ebr * ss, 512)
        used = [e for e in _entries(sector) if e.size]
        where = f"the extended boot record at sector {ebr}"
        if sector[510:512] != _MBR_SIGNATURE:
            if used:
                raise PartitionTableError(f"{where} lacks its 55 AA signature")
            break  # a blank record: no (more) logical partitions
        data = [e for e in used if e.type not in _EXTENDED]
        links = [e for e in used if e.type in _EXTENDED]
        if len(data) > 1 or len(links) > 1:
            raise PartitionTableError(
                f"{where} lists {len(data)} partitions and {len(links)} links"
            )
        if data:
            number, e = 5 + len(out), data[0]
            if e.type == 0:
                raise PartitionTableError(f"logical partition {number}: of type 0 (unused)")
            if ebr + e.start + e.size > ext_end:
                raise PartitionTableError(
                    f"logical partition {number}: sectors {ebr + e.start}+{e.size} past the "
                    f"end of its extended partition (sector {ext_end})"
                )
            out.append((number, ebr + e.start, e.size, e.type))
        ebr = None
        if links:
            ebr = ext_start + links[0].start
            if ebr >= ext_end:
                raise PartitionTableError(
                    f"{where} links to sector {ebr}, past its extended partition"
                )
    return out, ebrs


def _no_overlap(spans: list[tuple[str, int, int]]) -> None:
    """Refuse (what, start, size) spans of which two share a sector."""
    ordered = sorted(spans, key=lambda s: (s[1], s[1] + s[2]))
    for (what, start, size), (other, later, _) in zip(ordered, ordered[1:], strict=False):
        if later < start + size:
            raise PartitionTableError(f"{other} (sector {later}) overlaps {what}")


# -- GPT -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    first: int  # first and last usable sectors
    last: int
    entries_at: int  # sector of the entry array
    count: int
    array_crc: int


def _gpt(read: Read, primary: bytes, sectors: int, ss: int) -> list[TablePartition]:
    """The GPT partitions: the primary header's at sector 1, or the backup's at the last
    sector when the primary (header or entry array) is not valid."""
    if sectors < 3:
        raise PartitionTableError(f"a GPT protective MBR on a disk of {sectors} sectors")
    last = sectors - 1
    reasons = []
    for lba, what in ((1, "primary"), (last, "backup")):
        try:
            raw = primary if lba == 1 else _read(read, lba * ss, ss)
            header = _gpt_header(raw, lba, last, ss)
            length = header.count * GPT_ENTRY_SIZE
            array = _read(read, header.entries_at * ss, length) if length else b""
            if zlib.crc32(array) != header.array_crc:
                raise _BadHeader("its entry array's CRC32 does not match")
        except _BadHeader as exc:
            reasons.append(f"the {what} GPT header: {exc}")
            continue
        return _gpt_entries(array, header, ss)
    raise PartitionTableError("no valid GPT: " + "; ".join(reasons))


def _gpt_header(raw: bytes, lba: int, last: int, ss: int) -> _Header:
    """The header read at sector `lba` of a disk whose last sector is `last`, checked."""
    if raw[:8] != _GPT_SIGNATURE:
        raise _BadHeader("no EFI PART signature")
    size, crc = struct.unpack_from("<II", raw, 12)
    if not _GPT_HEADER_MIN <= size <= ss:
        raise _BadHeader(f"header size {size}, not {_GPT_HEADER_MIN} to {ss}")
    if zlib.crc32(raw[:16] + bytes(4) + raw[20:size]) != crc:
        raise _BadHeader("its CRC32 does not match")
    mine, _, first, last_usable = struct.unpack_from("<QQQQ", raw, 24)
    entries_at, count, entry_size, array_crc = struct.unpack_from("<QIII", raw, 72)
    if mine != lba:
        raise _BadHeader(f"it says it is at sector {mine}")
    if entry_size != GPT_ENTRY_SIZE:
        raise _BadHeader(f"entries of {entry_size} bytes, not {GPT_ENTRY_SIZE}")
    if count * entry_size > MAX_GPT_ARRAY:
        raise _BadHeader(f"{count} entries: more than {MAX_GPT_ARRAY} bytes of them")
    if not 2 <= first <= last_usable < last:
        raise _BadHeader(f"usable sectors {first} to {last_usable} on a disk of {last + 1}")
    if first <= lba <= last_usable:
        raise _BadHeader(f"the header at sector {lba} lies in the usable sectors")
    if count:  # the array: on the disk, off sector 0, its header and the usable sectors
        end = entries_at + -(-count * entry_size // ss)  # one past its last sector
        if entries_at == 0 or end > last + 1 or entries_at <= lba < end:
            raise _BadHeader(f"its entry array at sectors {entries_at} to {end - 1}")
        if entries_at <= last_usable and first < end:
            raise _BadHeader(f"its entry array at sector {entries_at} lies in the usable sectors")
    return _Header(first, last_usable, entries_at, count, array_crc)


def _gpt_entries(array: bytes, header: _Header, ss: int) -> list[TablePartition]:
    out = []
    spans = []
    for index in range(header.count):
        entry = array[index * GPT_ENTRY_SIZE : (index + 1) * GPT_ENTRY_SIZE]
        kind = entry[:16]
        if kind == bytes(16):
            continue  # an unused entry
        number = index + 1
        start, end = struct.unpack_from("<QQ", entry, 32)
        if not header.first <= start <= end <= header.last:
            raise PartitionTableError(
                f"GPT partition {number}: sectors {start} to {end}, outside the usable "
                f"{header.first} to {header.last}"
            )
        size = end - start + 1
        spans.append((f"GPT partition {number}", start, size))
        name = str(uuid.UUID(bytes_le=bytes(kind))).upper()
        out.append(TablePartition(number, start * ss, size * ss, name, _name(entry[56:128])))
    _no_overlap(spans)
    return out


def _name(raw: bytes) -> str:
    """A GPT partition name: UTF-16LE up to its first NUL (all 36 units if none)."""
    for i in range(0, len(raw), 2):
        if raw[i : i + 2] == b"\0\0":
            raw = raw[:i]
            break
    return raw.decode("utf-16-le", "replace")
