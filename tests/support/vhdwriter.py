"""Writers of differencing VHD and VHDX files, for the tests: qemu can neither make nor read
them.

Given the parent (a dynamic VHD or VHDX qemu made from `base.raw`), `base.raw` itself and a
modified copy `child.raw`, each writes a differencing file in which the blocks identical to
the parent are not present, and the changed blocks are present with a sector bitmap that
marks only the sectors that changed. The sectors whose bit is clear hold MARKER bytes, so a
reader that ignores the bitmap returns wrong bytes; the chain child -> parent reads exactly
`child.raw`. VHDX also writes a block whose every sector changed as FULLY_PRESENT, and a block
that became all zeros as ZERO. Blocks that are holes in both raw files are skipped without
reading them (SEEK_DATA), so sparse disks of several GiB are quick.

Layouts: VHD: footer copy, dynamic header at 512, BAT at 1536, locator data, blocks (bitmap
then data), footer. VHDX: header section (file identifier, two headers, two region tables),
a 1 MiB (empty) log at 1 MiB, the BAT, the metadata, payload blocks, sector bitmap blocks.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from backupfs.store.formats.crc32c import crc32c
from backupfs.store.formats.vhdx import (  # the GUIDs of the VHDX spec
    BAT_REGION,
    FILE_PARAMETERS,
    LOGICAL_SECTOR_SIZE,
    METADATA_REGION,
    PAGE_83_DATA,
    PARENT_LOCATOR,
    PHYSICAL_SECTOR_SIZE,
    VHDX_PARENT_TYPE,
    VIRTUAL_DISK_SIZE,
)

SECTOR = 512
MIB = 1 << 20
MARKER = 0xEE  # fills the sectors of a present block that are the parent's
VHD_UNALLOCATED = 0xFFFFFFFF
VHDX_ZERO, VHDX_FULL, VHDX_PARTIAL, VHDX_SB_PRESENT = 2, 6, 7, 6


@dataclass
class Written:
    """What a writer wrote: the state of each block it made present ("partial", "full",
    "zero"), by block index."""

    block_size: int
    blocks: dict[int, str] = field(default_factory=dict)


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _is_hole(fd: int, offset: int, length: int) -> bool:
    """No data in [offset, offset + length) of the file (SEEK_DATA finds none there)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return True
        raise


def changed_blocks(
    base_raw: Path, child_raw: Path, block_size: int
) -> Iterator[tuple[int, bytes, bytes]]:
    """(index, base bytes, child bytes) of the blocks where child.raw differs from base.raw
    (the child's last block may be short; base.raw is read as zeros past its end)."""
    size = child_raw.stat().st_size
    with open(base_raw, "rb") as base, open(child_raw, "rb") as child:
        for index in range(-(-size // block_size)):
            offset = index * block_size
            length = min(block_size, size - offset)
            if _is_hole(base.fileno(), offset, length) and _is_hole(child.fileno(), offset, length):
                continue
            old = os.pread(base.fileno(), length, offset).ljust(length, b"\0")
            new = os.pread(child.fileno(), length, offset)
            if old != new:
                yield index, old, new


def _changed_sectors(old: bytes, new: bytes) -> list[int]:
    return [
        s
        for s in range(len(new) // SECTOR)
        if old[s * SECTOR : (s + 1) * SECTOR] != new[s * SECTOR : (s + 1) * SECTOR]
    ]


def _with_marker(new: bytes, sectors: list[int], block_size: int) -> bytearray:
    """The block as stored: the changed sectors' bytes, MARKER everywhere else."""
    payload = bytearray([MARKER]) * block_size
    for s in sectors:
        payload[s * SECTOR : (s + 1) * SECTOR] = new[s * SECTOR : (s + 1) * SECTOR]
    return payload


# -- VHD


def vhd_checksum(data: bytes | bytearray, field_at: int) -> int:
    return ~(sum(data) - sum(data[field_at : field_at + 4])) & 0xFFFFFFFF


def vhd_footer(size: int, disk_type: int, data_offset: int, unique_id: bytes) -> bytes:
    """A VHD footer; the geometry is the largest (readers take `current size`)."""
    footer = bytearray(512)
    struct.pack_into(
        ">8sIIQI4sI4sQQHBBI",
        footer,
        0,
        b"conectix",
        2,
        0x00010000,
        data_offset,
        0,
        b"bfst",
        0x00010000,
        b"Wi2k",
        size,
        size,
        65535,
        16,
        255,
        disk_type,
    )
    footer[68:84] = unique_id
    struct.pack_into(">I", footer, 64, vhd_checksum(footer, 64))
    return bytes(footer)


def _vhd_locators(parent: Path, relative: bool, absolute: bool) -> list[tuple[bytes, bytes]]:
    locators = []
    if relative:
        locators.append((b"W2ru", (".\\" + parent.name).encode("utf-16-le")))
    if absolute:
        locators.append((b"W2ku", str(parent.resolve()).encode("utf-16-le")))
    return locators


def write_differencing_vhd(
    out: Path,
    parent: Path,
    base_raw: Path,
    child_raw: Path,
    *,
    block_size: int = 2 * MIB,
    relative: bool = True,
    absolute: bool = True,
) -> Written:
    """A differencing VHD (disk type 4) over `parent` whose chain reads `child.raw`; its
    locators: W2ru `.\\<parent name>` and W2ku the parent's absolute path (as chosen)."""
    size = child_raw.stat().st_size
    parent_footer = parent.read_bytes()[-512:]
    blocks = -(-size // block_size)
    bitmap_size = round_up(block_size // SECTOR // 8, SECTOR)
    bat_offset = 1536
    locators, at = [], round_up(bat_offset + blocks * 4, SECTOR)
    for code, data in _vhd_locators(parent, relative, absolute):
        locators.append((code, at, data))
        at = round_up(at + len(data), SECTOR)
    bat = [VHD_UNALLOCATED] * blocks
    written = Written(block_size)
    with open(out, "wb") as f:
        f.seek(at)
        for index, old, new in changed_blocks(base_raw, child_raw, block_size):
            sectors = _changed_sectors(old, new)
            bitmap = bytearray(bitmap_size)
            for s in sectors:
                bitmap[s // 8] |= 0x80 >> (s % 8)
            bat[index] = f.tell() // SECTOR
            f.write(bitmap + _with_marker(new, sectors, block_size))
            written.blocks[index] = "partial"
        unique_id = uuid.uuid4().bytes
        footer = vhd_footer(size, 4, 512, unique_id)
        f.write(footer)
        f.seek(0)
        f.write(footer)
        f.write(_vhd_header(bat_offset, blocks, block_size, parent, parent_footer, locators))
        f.write(struct.pack(f">{blocks}I", *bat))
        for _code, offset, data in locators:
            f.seek(offset)
            f.write(data)
    return written


def _vhd_header(
    bat_offset: int,
    blocks: int,
    block_size: int,
    parent: Path,
    parent_footer: bytes,
    locators: list[tuple[bytes, int, bytes]],
) -> bytes:
    header = bytearray(1024)
    struct.pack_into(
        ">8sQQIII", header, 0, b"cxsparse", 2**64 - 1, bat_offset, 0x00010000, blocks, block_size
    )
    header[40:56] = parent_footer[68:84]  # the parent's unique id
    header[56:60] = parent_footer[24:28]  # its time stamp
    name = parent.name.encode("utf-16-be")[:512]
    header[64 : 64 + len(name)] = name
    for index, (code, offset, data) in enumerate(locators):
        space = round_up(len(data), SECTOR)
        struct.pack_into(">4sIIIQ", header, 576 + 24 * index, code, space, len(data), 0, offset)
    struct.pack_into(">I", header, 36, vhd_checksum(header, 36))
    return bytes(header)


# -- VHDX


def vhdx_with_crc(data: bytes | bytearray) -> bytes:
    """`data` with its CRC-32C (bytes 4..8) computed."""
    data = bytearray(data)
    data[4:8] = bytes(4)
    struct.pack_into("<I", data, 4, crc32c(bytes(data)))
    return bytes(data)


def vhdx_current_header(path: Path) -> bytes:
    """The 4 KiB header of `path` with the higher sequence number (CRC not checked)."""
    with open(path, "rb") as f:
        headers = [os.pread(f.fileno(), 4096, offset) for offset in (64 << 10, 128 << 10)]
    return max(headers, key=lambda h: struct.unpack_from("<Q", h, 8)[0])


def _vhdx_header(sequence: int, log_offset: int) -> bytes:
    header = bytearray(4096)
    struct.pack_into("<4sIQ", header, 0, b"head", 0, sequence)
    header[16:32] = uuid.uuid4().bytes_le  # file write GUID
    header[32:48] = uuid.uuid4().bytes_le  # data write GUID
    struct.pack_into("<HHIQ", header, 64, 0, 1, MIB, log_offset)
    return vhdx_with_crc(header)


def _vhdx_region_table(bat: tuple[int, int], metadata: tuple[int, int]) -> bytes:
    table = bytearray(64 << 10)
    struct.pack_into("<4sIII", table, 0, b"regi", 0, 2, 0)
    for index, (guid, (offset, length)) in enumerate(
        [(BAT_REGION, bat), (METADATA_REGION, metadata)]
    ):
        table[16 + 32 * index : 32 + 32 * index] = guid
        struct.pack_into("<QII", table, 32 + 32 * index, offset, length, 1)
    return vhdx_with_crc(table)


def vhdx_parent_locator(entries: dict[str, str]) -> bytes:
    """A VHDX parent locator item holding `entries` (UTF-16LE keys and values)."""
    head = bytearray(VHDX_PARENT_TYPE + struct.pack("<HH", 0, len(entries)))
    strings = bytearray()
    at = 20 + 12 * len(entries)
    for key, value in entries.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        head += struct.pack("<IIHH", at + len(strings), at + len(strings) + len(k), len(k), len(v))
        strings += k + v
    return bytes(head + strings)


def _vhdx_metadata(block_size: int, size: int, locator: bytes) -> bytes:
    items = [
        (FILE_PARAMETERS, struct.pack("<II", block_size, 2), 4),  # HasParent; IsRequired
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", size), 6),  # IsVirtualDisk, IsRequired
        (PAGE_83_DATA, uuid.uuid4().bytes_le, 6),
        (LOGICAL_SECTOR_SIZE, struct.pack("<I", SECTOR), 6),
        (PHYSICAL_SECTOR_SIZE, struct.pack("<I", SECTOR), 6),
        (PARENT_LOCATOR, locator, 4),
    ]
    region = bytearray(MIB)
    struct.pack_into("<8sHH", region, 0, b"metadata", 0, len(items))
    at = 64 << 10
    for index, (guid, data, flags) in enumerate(items):
        region[32 + 32 * index : 48 + 32 * index] = guid
        struct.pack_into("<IIII", region, 48 + 32 * index, at, len(data), flags, 0)
        region[at : at + len(data)] = data
        at += len(data)
    return bytes(region)


def write_differencing_vhdx(
    out: Path,
    parent: Path,
    base_raw: Path,
    child_raw: Path,
    *,
    block_size: int = 2 * MIB,
    paths: dict[str, str] | None = None,
) -> Written:
    """A differencing VHDX (HasParent) over `parent` whose chain reads `child.raw`; its
    locator: parent_linkage = the parent's data write GUID, and `paths` (by default
    relative_path `.\\<parent name>`)."""
    size = child_raw.stat().st_size
    linkage = "{" + str(uuid.UUID(bytes_le=vhdx_current_header(parent)[32:48])) + "}"
    entries = {"parent_linkage": linkage, **(paths or {"relative_path": ".\\" + parent.name})}
    ratio = (1 << 23) * SECTOR // block_size
    blocks = -(-size // block_size)
    chunks = -(-blocks // ratio)
    bat = [0] * (chunks * (ratio + 1))
    bat_offset, bat_length = 2 * MIB, round_up(len(bat) * 8, MIB)
    metadata_offset = bat_offset + bat_length
    written = Written(block_size)
    bitmaps: dict[int, bytearray] = {}
    with open(out, "wb") as f:
        f.seek(metadata_offset + MIB)
        for index, old, new in changed_blocks(base_raw, child_raw, block_size):
            entry_at = index + index // ratio
            if not any(new):
                bat[entry_at] = VHDX_ZERO
                written.blocks[index] = "zero"
                continue
            sectors = _changed_sectors(old, new)
            full = len(sectors) == block_size // SECTOR
            bat[entry_at] = f.tell() | (VHDX_FULL if full else VHDX_PARTIAL)
            f.write(_with_marker(new, sectors, block_size))
            if full:
                written.blocks[index] = "full"
                continue
            written.blocks[index] = "partial"
            bitmap = bitmaps.setdefault(index // ratio, bytearray(MIB))
            first = (index % ratio) * (block_size // SECTOR)
            for s in sectors:
                bitmap[(first + s) // 8] |= 1 << ((first + s) % 8)
        for chunk, bitmap in bitmaps.items():
            bat[chunk * (ratio + 1) + ratio] = f.tell() | VHDX_SB_PRESENT
            f.write(bitmap)
        f.truncate(max(f.tell(), metadata_offset + MIB))
        _write_vhdx_head(f, (bat_offset, bat_length), (metadata_offset, MIB))
        f.seek(bat_offset)
        f.write(struct.pack(f"<{len(bat)}Q", *bat))
        f.seek(metadata_offset)
        f.write(_vhdx_metadata(block_size, size, vhdx_parent_locator(entries)))
    return written


def _write_vhdx_head(f: BinaryIO, bat: tuple[int, int], metadata: tuple[int, int]) -> None:
    f.seek(0)
    f.write(b"vhdxfile" + "backupfs tests".encode("utf-16-le"))
    for index, offset in enumerate((64 << 10, 128 << 10)):
        f.seek(offset)
        f.write(_vhdx_header(index + 1, MIB))
    for offset in (192 << 10, 256 << 10):
        f.seek(offset)
        f.write(_vhdx_region_table(bat, metadata))


# -- raw images for the tests


def make_sparse_raw(path: Path, size: int, pieces: list[tuple[int, int]], seed: int) -> None:
    """A sparse raw image of `size` bytes: random bytes at each (offset, length), holes
    elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in pieces:
            f.seek(offset)
            f.write(rng.randbytes(length))


def make_child_raw(
    base: Path, child: Path, pieces: list[tuple[int, int]], zeroed: list[tuple[int, int]], seed: int
) -> None:
    """`child`: a sparse copy of `base` with random bytes at `pieces` and zeros at `zeroed`
    (each (offset, length))."""
    rng = random.Random(seed)
    size = base.stat().st_size
    with open(base, "rb") as src, open(child, "wb") as dst:
        dst.truncate(size)
        offset = 0
        while offset < size:
            try:
                offset = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                break
            end = os.lseek(src.fileno(), offset, os.SEEK_HOLE)
            os.pwrite(dst.fileno(), os.pread(src.fileno(), end - offset, offset), offset)
            offset = end
        for offset, length in pieces:
            os.pwrite(dst.fileno(), rng.randbytes(length), offset)
        for offset, length in zeroed:
            os.pwrite(dst.fileno(), bytes(length), offset)
