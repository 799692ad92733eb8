"""backupfs/plan/parttable.py against the real tools: MBR (with logical partitions, one
beyond 2 TiB) and GPT images made by sfdisk, sgdisk and fdisk, read back through a
`read(offset, length)` function and compared with `sfdisk --json`; bare filesystems
(no table); a damaged primary GPT (the backup is used) and both damaged (refused).
Then crafted tables, each refused with PartitionTableError in well under a second and
in a bounded number of small reads, and random damage that never yields a wrong
partition."""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import subprocess
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest

from backupfs.errors import FormatError
from backupfs.plan.parttable import (
    MAX_GPT_ARRAY,
    MAX_LOGICAL,
    PartitionTableError,
    TablePartition,
    read_partitions,
)

SECTOR, MIB, TIB = 512, 1 << 20, 1 << 40
LINUX = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")


def run(argv: list[str], stdin: str | None = None) -> str:
    tool = shutil.which(argv[0]) or shutil.which(argv[0], path="/usr/sbin:/sbin")
    if tool is None:
        pytest.skip(f"{argv[0]} is not installed")
    proc = subprocess.run([tool, *argv[1:]], input=stdin, capture_output=True, text=True)
    assert proc.returncode == 0, (argv, proc.stderr)
    return proc.stdout


class Disk:
    """An image read the way backupfs reads one over HTTP, each read recorded."""

    def __init__(self, source: Path | bytes | bytearray) -> None:
        self.source = source
        self.size = source.stat().st_size if isinstance(source, Path) else len(source)
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        if not isinstance(self.source, Path):
            return bytes(self.source[offset : offset + length])
        with open(self.source, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def partitions(self, sector_size: int = SECTOR) -> list[TablePartition]:
        return read_partitions(self.read, self.size, sector_size)


def sfdisk_view(image: Path) -> list[TablePartition]:
    """What `sfdisk --json` lists, in bytes; an MBR's extended container left out."""
    table = json.loads(run(["sfdisk", "--json", str(image)]))["partitiontable"]
    ss, out = table["sectorsize"], []
    for p in table.get("partitions", []):
        if table["label"] == "dos" and p["type"] in {"5", "f", "85"}:
            continue
        number = int(re.sub(r".*?([0-9]+)$", r"\1", p["node"]))
        out.append(TablePartition(number, p["start"] * ss, p["size"] * ss, p["type"],
                                  p.get("name", "")))  # fmt: skip
    return out


def blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sfdisk(image: Path, script: str) -> Path:
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", str(image)],
        stdin=script)  # fmt: skip
    return image


def put_entry(disk: bytearray, sector: int, slot: int, kind: int, start: int, size: int) -> None:
    """One MBR/EBR entry of the table at `sector`, and the table's 55 AA signature."""
    at = sector * SECTOR
    struct.pack_into("<B3sB3sII", disk, at + 446 + 16 * slot, 0, b"\xfe\xff\xff", kind,
                     b"\xfe\xff\xff", start, size)  # fmt: skip
    disk[at + 510 : at + 512] = b"\x55\xaa"


# -- real images ------------------------------------------------------------------------


DOS_SCRIPT = """label: dos
start=2048, size=16384, type=83
start=18432, size=8192, type=7
start=26624, size=65536, type=f
start=28672, size=8192, type=83
start=38912, size=8192, type=82
start=49152, size=8192, type=c
start=92160, size=8192, type=83
"""


def test_mbr_primaries_and_three_logicals_as_sfdisk_lists_them(tmp_path: Path) -> None:
    image = sfdisk(blank(tmp_path / "disk.img", 64 * MIB), DOS_SCRIPT)
    disk = Disk(image)
    found = disk.partitions()
    assert found == sfdisk_view(image)
    assert [p.number for p in found] == [1, 2, 4, 5, 6, 7]
    assert (found[3].start, found[3].size, found[3].type) == (28672 * SECTOR, 4 * MIB, "83")
    assert len(disk.reads) == 1 + 3  # the MBR, then one extended boot record per logical


def test_mbr_logical_partition_beyond_2_tib(tmp_path: Path) -> None:
    """EBR offsets are relative, so logical partitions may lie past 2 TiB (which sfdisk
    reads but will not write): the records are written here, on a sparse 3 TiB file."""
    image = sfdisk(blank(tmp_path / "disk.img", 3 * TIB), "label: dos\nstart=2048, size=2048\n")
    ext = (1 << 32) - (1 << 20)
    with open(image, "rb") as f:
        table = bytearray(f.read(SECTOR))
    put_entry(table, 0, 1, 0x05, ext, 1 << 31)
    records = {ext: bytearray(SECTOR), ext + (1 << 21): bytearray(SECTOR)}
    put_entry(records[ext], 0, 0, 0x83, 2048, 4096)
    put_entry(records[ext], 0, 1, 0x05, 1 << 21, 1 << 22)
    put_entry(records[ext + (1 << 21)], 0, 0, 0x8E, 2048, 8192)
    with open(image, "r+b") as f:
        for sector, data in [(0, table), *records.items()]:
            f.seek(sector * SECTOR)
            f.write(data)
    found = Disk(image).partitions()
    assert found == sfdisk_view(image)
    assert [p.number for p in found] == [1, 5, 6] and found[2].start > 2 * TIB
    assert found[2] == TablePartition(6, (ext + (1 << 21) + 2048) * SECTOR, 4 * MIB, "8e")


def sgdisk_image(path: Path, size: int = 64 * MIB, far: int | None = None) -> Path:
    """Partitions 1, 2, 4 (and 3 at sector `far`): names, EFI, swap, Linux and LVM types."""
    blank(path, size)
    argv = ["sgdisk", "-n", "1:2048:+16M", "-t", "1:ef00", "-c", "1:EFI system", "-n", "2:0:+8M",
            "-t", "2:8200", "-n", "4:0:+4M", "-t", "4:8300", "-c", "4:root ü"]  # fmt: skip
    if far is not None:
        argv += ["-n", f"3:{far}:+64M", "-t", "3:8e00", "-c", "3:far away"]
    run([*argv, str(path)])
    return path


def test_gpt_from_sgdisk_with_names_and_types(tmp_path: Path) -> None:
    far = (5 * TIB // 2) // SECTOR
    image = sgdisk_image(tmp_path / "disk.img", 3 * TIB, far)
    disk = Disk(image)
    found = disk.partitions()
    assert found == sfdisk_view(image)
    assert [(p.number, p.name) for p in found] == [
        (1, "EFI system"), (2, ""), (3, "far away"), (4, "root ü")]  # fmt: skip
    assert found[0].type == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    assert (
        found[2].start == far * SECTOR and found[2].type == "E6D6D379-F507-44C2-A23C-238F2A3DF928"
    )
    assert len(disk.reads) == 2  # the MBR with the header after it, the entry array


def test_gpt_from_sfdisk_and_a_hybrid_mbr(tmp_path: Path) -> None:
    script = 'label: gpt\nstart=2048, size=4096, type=L, name="data one"\n'
    image = sfdisk(blank(tmp_path / "disk.img", 64 * MIB), script + "size=2048, type=S\n")
    assert Disk(image).partitions() == sfdisk_view(image)
    hybrid = sgdisk_image(tmp_path / "hybrid.img")
    run(["sgdisk", "-h", "1:2:EE", str(hybrid)])  # MBR entries: GPT 1 and 2, then 0xEE
    with open(hybrid, "rb") as f:
        kinds = f.read(SECTOR)[446 + 4 : 510 : 16]
    assert kinds == bytes([0xEF, 0x82, 0xEE, 0])
    assert Disk(hybrid).partitions() == sfdisk_view(hybrid)


def test_gpt_of_4k_sectors_made_by_fdisk(tmp_path: Path) -> None:
    image = blank(tmp_path / "disk.img", 64 * MIB)
    run(["fdisk", "-b", "4096", str(image)], stdin="g\nn\n1\n\n+8M\nn\n3\n\n+4M\nw\n")
    listing = run(["fdisk", "-b", "4096", "-l", "-o", "Device,Start,Sectors,Type-UUID", str(image)])
    rows = [line.split() for line in listing.splitlines() if line.startswith(f"{image}")]
    expected = [TablePartition(int(dev[len(str(image)) :]), int(start) * 4096, int(n) * 4096, t)
                for dev, start, n, t in rows]  # fmt: skip
    assert [p.number for p in expected] == [1, 3]
    assert Disk(image).partitions(4096) == expected
    with pytest.raises(PartitionTableError, match="no valid GPT"):
        Disk(image).partitions(512)  # the sector size is the caller's to know


@pytest.mark.parametrize("mkfs", [None, ["mkfs.ext4", "-q", "-F"], ["mkfs.vfat"],
                                  ["mkfs.ntfs", "-q", "-F", "-Q"]])  # fmt: skip
def test_bare_filesystem_is_the_whole_disk_as_partition_0(tmp_path: Path, mkfs: Any) -> None:
    image = blank(tmp_path / "disk.img", 32 * MIB)
    if mkfs:
        run([*mkfs, str(image)])
    assert Disk(image).partitions() == [TablePartition(0, 0, 32 * MIB, "")]


def damage(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("offset", [SECTOR + 60, SECTOR + 16, 2 * SECTOR + 60, 3 * SECTOR])
def test_damaged_primary_gpt_falls_back_to_the_backup(tmp_path: Path, offset: int) -> None:
    """The disk GUID or CRC of the primary header, a name in its entry array."""
    image = sgdisk_image(tmp_path / "disk.img")
    before = Disk(image).partitions()
    damage(image, offset)
    disk = Disk(image)
    assert disk.partitions() == before == sfdisk_view(image)
    assert disk.reads[-2:] == [(64 * MIB - SECTOR, SECTOR), (64 * MIB - 33 * SECTOR, 128 * 128)]


def test_both_gpts_damaged_is_refused(tmp_path: Path) -> None:
    image = sgdisk_image(tmp_path / "disk.img")
    damage(image, SECTOR + 60)
    damage(image, 64 * MIB - SECTOR + 60)
    with pytest.raises(PartitionTableError, match="primary GPT header.*backup GPT header"):
        Disk(image).partitions()


def test_random_damage_never_yields_a_wrong_partition(tmp_path: Path) -> None:
    """Any byte of the primary GPT (header, array): the backup's partitions, the same. Any
    byte of an MBR or EBR: refused, or partitions that are on the disk and do not overlap."""
    rng = random.Random(7)
    disk = bytearray(sgdisk_image(tmp_path / "g.img").read_bytes())
    good = Disk(disk).partitions()
    for _ in range(300):
        at, bit = rng.randrange(SECTOR, 34 * SECTOR), 1 << rng.randrange(8)
        disk[at] ^= bit
        assert Disk(disk).partitions() == good, at
        disk[at] ^= bit
    disk = bytearray(sfdisk(blank(tmp_path / "d.img", 64 * MIB), DOS_SCRIPT).read_bytes())
    tables = [0, 26624, 36864, 47104]  # the MBR and the extended boot records sfdisk wrote
    assert all(disk[s * SECTOR + 510 : s * SECTOR + 512] == b"\x55\xaa" for s in tables)
    for _ in range(1000):
        at, bit = rng.choice(tables) * SECTOR + rng.randrange(446, 512), 1 << rng.randrange(8)
        disk[at] ^= bit
        try:
            found = Disk(disk).partitions()
        except PartitionTableError:
            continue
        finally:
            disk[at] ^= bit
        spans = sorted((p.start, p.start + p.size) for p in found)
        assert all(0 <= a < b <= len(disk) for a, b in spans)
        assert all(b <= c for (_, b), (c, _) in zip(spans, spans[1:], strict=False))
        assert all(p.start > 0 for p in found if p.number)  # never over the MBR


# -- crafted tables -----------------------------------------------------------------------


def refused(source: bytes | bytearray | Disk, match: str) -> Disk:
    disk = source if isinstance(source, Disk) else Disk(source)
    began = time.monotonic()
    with pytest.raises(PartitionTableError, match=match) as caught:
        disk.partitions()
    assert time.monotonic() - began < 0.5
    assert isinstance(caught.value, FormatError)
    assert len(disk.reads) <= MAX_LOGICAL + 2
    assert all(length <= MAX_GPT_ARRAY for _, length in disk.reads)
    return disk


def mbr(sectors: int, *entries: tuple[int, int, int, int]) -> bytearray:
    """A disk of `sectors` sectors with an MBR of (slot, type, start, size) entries."""
    disk = bytearray(sectors * SECTOR)
    for entry in entries:
        put_entry(disk, 0, *entry)
    return disk


@pytest.mark.parametrize(("entries", "match"), [
    ([(0, 0x83, 2048, 2048)], "partition 1: sectors 2048\\+2048 past the end"),
    ([(2, 0x83, 2048, 0xFFFFFFFF)], "partition 3: .* past the end"),
    ([(0, 0x83, 0, 100)], "partition 1 .* overlaps the MBR|the MBR .* overlaps"),
    ([(0, 0x83, 100, 100), (1, 0x07, 150, 100)], "partition 2 .* overlaps partition 1"),
    ([(0, 0x05, 100, 1000), (1, 0x83, 500, 10)], "overlaps extended partition 1"),
    ([(0, 0x05, 100, 100), (1, 0x0F, 300, 100)], "two extended partitions"),
])  # fmt: skip
def test_crafted_mbr_is_refused(entries: list[tuple[int, int, int, int]], match: str) -> None:
    refused(mbr(4000, *entries), match)


def extended(*records: tuple[int, int, int, int, int]) -> bytearray:
    """An extended partition at sector 100 of 1000 sectors, with its boot records as
    (sector, slot, type, start, size): starts relative to the record for data, to the
    extended partition for links."""
    disk = mbr(4000, (0, 0x83, 2000, 100), (1, 0x05, 100, 1000))
    for sector, *entry in records:
        put_entry(disk, sector, *entry)
    return disk


@pytest.mark.parametrize(("records", "match"), [
    ([(100, 0, 0x83, 2, 10), (100, 1, 0x05, 0, 20)], "loops at sector 100"),
    ([(100, 1, 0x05, 50, 20), (150, 1, 0x05, 0, 20)], "loops at sector 100"),
    ([(100, 0, 0x83, 2, 10), (100, 1, 0x05, 1000, 20)], "links to sector 1100, past"),
    ([(100, 0, 0x83, 2, 10), (100, 1, 0x05, 0xFFFFFFFF, 20)], "past its extended"),
    ([(100, 0, 0x83, 2, 999)], "logical partition 5: .* past the end of its extended"),
    ([(100, 0, 0x83, 0xFFFFFFFF, 0xFFFFFFFF)], "logical partition 5: .* past the end"),
    ([(100, 0, 0x83, 0, 10)], "partition 5 .* overlaps the extended boot record"),
    ([(100, 0, 0x83, 2, 10), (100, 1, 0x05, 5, 20)], "extended boot record at sector 105"),
    ([(100, 0, 0x83, 2, 10), (100, 2, 0x07, 20, 10)], "lists 2 partitions and 0 links"),
    ([(100, 1, 0x05, 50, 9), (100, 2, 0x85, 90, 9)], "lists 0 partitions and 2 links"),
    ([(100, 0, 0x00, 2, 10)], "logical partition 5: of type 0"),
])  # fmt: skip
def test_crafted_logical_partitions_are_refused(records: list[Any], match: str) -> None:
    refused(extended(*records), match)


def test_blank_records_and_data_less_links_are_read() -> None:
    """A first record with only a link, a last one left blank (no signature either)."""
    disk = extended((100, 1, 0x05, 50, 9), (150, 0, 0x83, 2, 7), (150, 1, 0x05, 300, 9))
    primary, logical = TablePartition(1, 2000 * SECTOR, 100 * SECTOR, "83"), 152 * SECTOR
    assert Disk(disk).partitions() == [primary, TablePartition(5, logical, 7 * SECTOR, "83")]
    put_entry(disk, 400, 0, 0x07, 2, 5)
    assert Disk(disk).partitions()[2] == TablePartition(6, 402 * SECTOR, 5 * SECTOR, "7")
    disk[400 * SECTOR + 510] = 0  # something in it, no signature: refused
    refused(disk, "the extended boot record at sector 400 lacks its 55 AA")


def test_a_chain_of_10000_logical_partitions_is_cut_short() -> None:
    """Made up as it is read: record k at sector 2048 + 2k, its partition after it."""
    links, sectors = 10_000, 1 << 33

    def read(offset: int, length: int) -> bytes:
        disk.reads.append((offset, length))
        sector, buf = offset // SECTOR, bytearray(max(length, SECTOR))
        if sector == 0:
            put_entry(buf, 0, 0, 0x05, 2048, 2 * links)
        else:
            k = (sector - 2048) // 2
            put_entry(buf, 0, 0, 0x83, 1, 1)
            if k + 1 < links:
                put_entry(buf, 0, 1, 0x05, 2 * (k + 1), 2)
        return bytes(buf[:length])

    disk = Disk(b"")
    disk.size, disk.read = sectors * SECTOR, read  # type: ignore[method-assign]
    refused(disk, f"more than {MAX_LOGICAL} logical partitions")
    assert len(disk.reads) == 1 + MAX_LOGICAL


def gpt(parts: list[tuple[int, int, int]], sectors: int = 2048, **header: Any) -> bytearray:
    """A GPT disk with 128 entries, (index, first, last) of them Linux partitions; both
    headers with `header`'s fields (by name), CRC32s right unless `crc` is given."""
    disk = bytearray(sectors * SECTOR)
    first, last = 34, sectors - 34
    array = bytearray(128 * 128)
    for index, start, end in parts:
        struct.pack_into("<16s16sQQ", array, index * 128, LINUX.bytes_le, uuid.uuid4().bytes_le,
                         start, end)  # fmt: skip
    for mine, other, at in ((1, sectors - 1, 2), (sectors - 1, 1, last + 1)):
        fields: dict[str, Any] = dict(
            sig=b"EFI PART", revision=0x10000, size=92, crc=0, reserved=0, mine=mine,
            other=other, first=first, last=last, guid=bytes(16), entries=at, count=128,
            entry_size=128, array_crc=zlib.crc32(array))  # fmt: skip
        fields.update(header)
        raw = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", *fields.values()).ljust(SECTOR, b"\0"))
        if "crc" not in header:
            struct.pack_into("<I", raw, 16, zlib.crc32(raw[: fields["size"]]))
        disk[mine * SECTOR : (mine + 1) * SECTOR] = raw
        disk[at * SECTOR : at * SECTOR + len(array)] = array
    put_entry(disk, 0, 0, 0xEE, 1, sectors - 1)
    return disk


def test_crafted_gpt_builder_reads_back() -> None:
    found = Disk(gpt([(0, 34, 99), (5, 100, 2014)])).partitions()
    kind = str(LINUX).upper()
    assert found == [TablePartition(1, 34 * SECTOR, 66 * SECTOR, kind),
                     TablePartition(6, 100 * SECTOR, 1915 * SECTOR, kind)]  # fmt: skip


@pytest.mark.parametrize(("header", "match"), [
    ({"count": 2**32 - 1}, "4294967295 entries: more than 1048576 bytes"),
    ({"count": MAX_GPT_ARRAY // 128 + 1}, "8193 entries"),
    ({"entry_size": 4096}, "entries of 4096 bytes"),
    ({"entry_size": 0}, "entries of 0 bytes"),
    ({"size": 91}, "header size 91"),
    ({"size": 513}, "header size 513"),
    ({"size": 2**32 - 1}, "header size 4294967295"),
    ({"crc": 12345}, "its CRC32 does not match"),
    ({"array_crc": 12345}, "entry array's CRC32 does not match"),
    ({"sig": b"EFI PARU"}, "no EFI PART signature"),
    ({"mine": 7}, "it says it is at sector 7"),
    ({"first": 2**64 - 1}, "usable sectors 18446744073709551615 to"),
    ({"last": 2**64 - 1}, "usable sectors 34 to 18446744073709551615"),
    ({"last": 2047}, "usable sectors 34 to 2047"),
    ({"first": 1}, "usable sectors 1 to"),
    ({"entries": 2**64 - 1}, "entry array at sectors 18446744073709551615"),
    ({"entries": 2**63}, "entry array at sectors 9223372036854775808"),
    ({"entries": 0}, "entry array at sectors 0 to 31"),
    ({"entries": 2040}, "entry array at sectors 2040 to 2071"),
    ({"entries": 40}, "entry array at sector 40 lies in the usable"),
])  # fmt: skip
def test_crafted_gpt_header_is_refused(header: dict[str, Any], match: str) -> None:
    disk = refused(gpt([(0, 34, 99)], **header), f"primary GPT header: (its )?{match}.*backup GPT")
    assert len(disk.reads) <= 4


@pytest.mark.parametrize(("parts", "match"), [
    ([(0, 34, 2**64 - 1)], "partition 1: sectors 34 to 18446744073709551615, outside"),
    ([(3, 2**64 - 1, 2**64 - 1)], "partition 4: .* outside the usable 34 to 2014"),
    ([(0, 100, 50)], "partition 1: sectors 100 to 50"),
    ([(0, 2, 100)], "partition 1: sectors 2 to 100, outside the usable"),
    ([(0, 40, 2047)], "outside the usable 34 to 2014"),
    ([(0, 40, 100), (127, 100, 200)], "GPT partition 128 .* overlaps GPT partition 1"),
    ([(0, 40, 1000), (1, 50, 60)], "GPT partition 2 .* overlaps GPT partition 1"),
])  # fmt: skip
def test_crafted_gpt_partitions_are_refused(parts: list[tuple[int, int, int]], match: str) -> None:
    refused(gpt(parts), match)


def test_odd_disks_and_sector_sizes_are_refused() -> None:
    refused(Disk(b"\0" * 100), "smaller than one sector")
    refused(Disk(gpt([])[:1024]), "protective MBR on a disk of 2 sectors")
    with pytest.raises(PartitionTableError, match="sector size 520"):
        Disk(gpt([])).partitions(520)
    assert Disk(gpt([])).partitions() == []  # a valid GPT listing nothing
