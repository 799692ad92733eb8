"""The VHDX reader against hostile VHDXs, each patched from a real one (qemu-img's, or a
differencing VHDX of tests/support/vhdwriter.py) so that the check under test is the one
that fires: file identifier, headers and log, region tables, metadata items, BAT entries,
sector bitmaps and parent locators, refused with a FormatError naming the file."""

from __future__ import annotations

import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from backupfs.errors import FormatError
from backupfs.store.formats import local
from backupfs.store.formats.vhdx import VhdxLayer
from tests.support.vhdwriter import MIB, PARENT_LOCATOR, vhdx_with_crc
from tests.support.vhdx_images import (
    BAT_GUID,
    FILE_PARAMETERS,
    LOGICAL_SECTOR_SIZE,
    METADATA_GUID,
    SIZE,
    VIRTUAL_DISK_SIZE,
    Patch,
    bat_entry,
    make_images,
    open_chain,
    region_offset,
)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is not installed"
)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The images of `make_images`, made once for the module."""
    return make_images(tmp_path_factory.mktemp("vhdx"))


# -- hostile files: each patched so that the check under test is the one that fires


def headers(change: Callable[[bytearray], None]) -> Patch:
    """`change` both headers, their CRC recomputed."""

    def patch(data: bytearray) -> None:
        for offset in (64 << 10, 128 << 10):
            header = bytearray(data[offset : offset + 4096])
            change(header)
            data[offset : offset + 4096] = vhdx_with_crc(header)

    return patch


def region_tables(change: Callable[[bytearray], None]) -> Patch:
    """`change` both region tables, their CRC recomputed."""

    def patch(data: bytearray) -> None:
        for offset in (192 << 10, 256 << 10):
            table = bytearray(data[offset : offset + (64 << 10)])
            change(table)
            data[offset : offset + (64 << 10)] = vhdx_with_crc(table)

    return patch


def region_entry(guid: bytes, fmt: str, at: int, value: int) -> Patch:
    def change(table: bytearray) -> None:
        (count,) = struct.unpack_from("<I", table, 8)
        index = next(i for i in range(count) if table[16 + 32 * i : 32 + 32 * i] == guid)
        struct.pack_into(fmt, table, 16 + 32 * index + at, value)

    return region_tables(change)


def extra_region(table: bytearray) -> None:
    (count,) = struct.unpack_from("<I", table, 8)
    struct.pack_into("<I", table, 8, count + 1)
    at = 16 + 32 * count
    table[at : at + 16] = uuid.uuid4().bytes_le
    struct.pack_into("<QII", table, at + 16, 64 * MIB, MIB, 1)


def metadata_entry(guid: bytes, fmt: str, at: int, value: int | bytes) -> Patch:
    def patch(data: bytearray) -> None:
        table = region_offset(data, METADATA_GUID)
        (count,) = struct.unpack_from("<H", data, table + 10)
        index = next(
            i for i in range(count) if data[table + 32 + 32 * i : table + 48 + 32 * i] == guid
        )
        struct.pack_into(fmt, data, table + 32 + 32 * index + at, value)

    return patch


def extra_metadata(data: bytearray) -> None:
    table = region_offset(data, METADATA_GUID)
    (count,) = struct.unpack_from("<H", data, table + 10)
    struct.pack_into("<H", data, table + 10, count + 1)
    at = table + 32 + 32 * count
    data[at : at + 16] = uuid.uuid4().bytes_le
    struct.pack_into("<IIII", data, at + 16, 65536 + 4096, 8, 4, 0)


def item(guid: bytes, fmt: str, value: int) -> Patch:
    def patch(data: bytearray) -> None:
        table = region_offset(data, METADATA_GUID)
        (count,) = struct.unpack_from("<H", data, table + 10)
        for i in range(count):
            at = table + 32 + 32 * i
            if data[at : at + 16] == guid:
                (offset,) = struct.unpack_from("<I", data, at + 16)
                struct.pack_into(fmt, data, table + offset, value)

    return patch


def locator_field(at: int, fmt: str, value: int) -> Patch:
    def patch(data: bytearray) -> None:
        table = region_offset(data, METADATA_GUID)
        (count,) = struct.unpack_from("<H", data, table + 10)
        for i in range(count):
            entry = table + 32 + 32 * i
            if data[entry : entry + 16] == PARENT_LOCATOR:
                (offset,) = struct.unpack_from("<I", data, entry + 16)
                struct.pack_into(fmt, data, table + offset + at, value)

    return patch


def rename_key(old: str, new: str) -> Patch:
    """`old` made `new` (as long) in the metadata region's UTF-16 text."""

    def patch(data: bytearray) -> None:
        at = data.index(old.encode("utf-16-le"), region_offset(data, METADATA_GUID))
        data[at : at + 2 * len(new)] = new.encode("utf-16-le")

    return patch


def no_locator(data: bytearray) -> None:
    """The parent locator's entry made an unknown, optional item."""
    metadata_entry(PARENT_LOCATOR, "<I", 24, 0)(data)
    metadata_entry(PARENT_LOCATOR, "16s", 0, uuid.uuid4().bytes_le)(data)


def flip(*offsets: int) -> Patch:
    def patch(data: bytearray) -> None:
        for offset in offsets:
            data[offset] ^= 0x55

    return patch


def set_log_guid(header: bytearray) -> None:
    header[48:64] = uuid.uuid4().bytes_le


def version_2(header: bytearray) -> None:
    struct.pack_into("<H", header, 66, 2)


def no_signature(data: bytearray) -> None:
    data[:8] = b"vhdxfil_"


SB_ENTRY = 2048  # of a differencing file of 2 MiB blocks: the first chunk's bitmap entry
CASES: list[tuple[str, str, Patch, str]] = [
    ("no file identifier", "sparse", no_signature, "lacks its file identifier"),
    ("both headers bad", "sparse", flip(65536 + 100, 131072 + 100), "has no valid header"),
    ("header version", "sparse", headers(version_2), "no valid header"),
    ("log to replay", "sparse", headers(set_log_guid), "log needs replaying"),
    ("both region tables bad", "sparse", flip(196608 + 40, 262144 + 40), "no valid region table"),
    ("regions overlap", "sparse", region_entry(BAT_GUID, "<Q", 16, 3 * MIB), "overlaps"),
    ("region over the log", "sparse", region_entry(BAT_GUID, "<Q", 16, MIB), "overlaps"),
    ("region past the end", "sparse", region_entry(BAT_GUID, "<Q", 16, 1 << 40), "past the end"),
    ("region unaligned", "sparse", region_entry(BAT_GUID, "<Q", 16, 2 * MIB + 4096), "aligned"),
    ("region required, unknown", "sparse", region_tables(extra_region), "is required and unknown"),
    ("no metadata table", "sparse", region_entry(METADATA_GUID, "<Q", 16, 5 * MIB), "signature"),
    (
        "metadata past its region",
        "sparse",
        metadata_entry(FILE_PARAMETERS, "<I", 16, MIB),
        "past its region",
    ),
    (
        "metadata item absurd",
        "sparse",
        metadata_entry(FILE_PARAMETERS, "<I", 20, 2 * MIB),
        "absurd",
    ),
    (
        "metadata item short",
        "sparse",
        metadata_entry(VIRTUAL_DISK_SIZE, "<I", 20, 4),
        "lacks its virtual disk size",
    ),
    (
        "metadata item twice",
        "sparse",
        metadata_entry(VIRTUAL_DISK_SIZE, "16s", 0, FILE_PARAMETERS),
        "two file parameters",
    ),
    ("metadata required, unknown", "sparse", extra_metadata, "is required and unknown"),
    ("block size not a power of two", "sparse", item(FILE_PARAMETERS, "<I", 3 * MIB), "block size"),
    ("block size absurd", "sparse", item(FILE_PARAMETERS, "<I", 512 * MIB), "block size"),
    ("block size tiny", "sparse", item(FILE_PARAMETERS, "<I", 4096), "block size"),
    ("sector size", "sparse", item(LOGICAL_SECTOR_SIZE, "<I", 1000), "sector sizes"),
    ("virtual size absurd", "sparse", item(VIRTUAL_DISK_SIZE, "<Q", 1 << 50), "virtual size"),
    ("virtual size not sectors", "sparse", item(VIRTUAL_DISK_SIZE, "<Q", SIZE - 7), "virtual size"),
    (
        "BAT larger than bounds",
        "sparse",
        item(VIRTUAL_DISK_SIZE, "<Q", 60 << 40),
        "larger than 32 MiB",
    ),
    ("BAT region too small", "sparse", item(VIRTUAL_DISK_SIZE, "<Q", 200 << 30), "too small"),
    (
        "BAT entry past the end",
        "sparse",
        bat_entry(0, (1 << 40) | 6),
        "block 0 points past the end",
    ),
    ("BAT entry into the log", "sparse", bat_entry(0, MIB | 6), "block 0 points into the headers"),
    ("BAT entry into the header", "sparse", bat_entry(1, 6), "block 1 points into the headers"),
    ("BAT entry into the BAT", "sparse", bat_entry(0, 2 * MIB | 6), "block 0 points into"),
    ("BAT entry reserved state", "sparse", bat_entry(0, 8 * MIB | 4), "reserved state 4"),
    ("partially present, no parent", "sparse", bat_entry(0, 8 * MIB | 7), "without a parent"),
    ("no sector bitmap", "child", bat_entry(SB_ENTRY, 0), "its sector bitmap is not"),
    (
        "sector bitmap past the end",
        "child",
        bat_entry(SB_ENTRY, (1 << 40) | 6),
        "sector bitmap 0 points past",
    ),
    ("locator type", "child", locator_field(0, "<I", 1234), "not of the VHDX type"),
    ("locator count", "child", locator_field(18, "<H", 60000), "run past its item"),
    ("locator key past its item", "child", locator_field(28, "<H", 0xFFFE), "past its item"),
    ("locator value offset zero", "child", locator_field(24, "<I", 0), "past its item"),
    ("locator not UTF-16", "child", locator_field(30, "<H", 77), "is not UTF-16"),
    (
        "no parent_linkage",
        "child",
        rename_key("parent_linkage", "parent_linkagX"),
        "lacks parent_linkage",
    ),
    ("no path", "child", rename_key("relative_path", "relative_patX"), "no relative_path"),
    (
        "linkage not a GUID",
        "child",
        rename_key("parent_linkage{", "parent_linkagex"),
        "is not a GUID",
    ),
    ("no parent locator", "child", no_locator, "without a parent locator"),
]


def assert_refused(path: Path, fragment: str) -> None:
    with pytest.raises(FormatError) as caught:
        chain = open_chain(path)
        local.read_chain(chain, 0, chain[0].layer.virtual_size)
    message = str(caught.value)
    assert message.startswith(f"{path.name}: vhdx ") and "\n" not in message
    assert fragment in message


@pytest.mark.parametrize(
    ("source", "patch", "fragment"),
    [pytest.param(source, patch, fragment, id=name) for name, source, patch, fragment in CASES],
)
def test_hostile_vhdx_is_refused(
    images: Path, tmp_path: Path, source: str, patch: Patch, fragment: str
) -> None:
    data = bytearray((images / f"{source}.vhdx").read_bytes())
    patch(data)
    shutil.copy(images / "dynamic.vhdx", tmp_path / "dynamic.vhdx")
    hostile = tmp_path / f"hostile-{source}.vhdx"
    hostile.write_bytes(data)
    assert_refused(hostile, fragment)


def test_too_small_a_file_is_refused() -> None:
    with pytest.raises(FormatError, match="smaller than the 1 MiB header section"):
        VhdxLayer("tiny.vhdx", 100_000)
