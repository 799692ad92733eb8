"""Partition tables as a hostile image holds them: GPTs written here byte by byte (with
their CRC32s) listing more partitions than anyone attaches, and real sfdisk output for
images whose names end in a digit (sfdisk calls their partitions disk0p1, not disk01).
Read with the real sfdisk and blkid, as `backupfs attach` reads them; a hybrid MBR too."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backupfs.attach import partitions
from backupfs.errors import UserError

SECTOR = 512
LINUX_DATA = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4").bytes_le


def write_gpt(path: Path, slots: list[int], entries: int = 128, size: int = 64 << 20) -> None:
    """A GPT disk of `size` bytes with room for `entries` partitions; `slots` (0-based)
    hold one 8-sector Linux partition each. Both headers and entry arrays, a protective
    MBR, CRC32s right: what sfdisk reads without complaint."""
    total = size // SECTOR
    array_sectors = -(-entries * 128 // SECTOR)
    first, last = 2 + array_sectors, total - 2 - array_sectors
    array = bytearray(entries * 128)
    for n, slot in enumerate(slots):
        start = first + 8 * n
        struct.pack_into("<16s16sQQQ", array, slot * 128, LINUX_DATA, uuid.uuid4().bytes_le,
                         start, start + 7, 0)  # fmt: skip
    disk = uuid.uuid4().bytes_le

    def header(mine: int, other: int, array_at: int) -> bytes:
        fields = (b"EFI PART", 0x10000, 92, 0, 0, mine, other, first, last, disk, array_at,
                  entries, 128, zlib.crc32(array))  # fmt: skip
        raw = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", *fields))
        struct.pack_into("<I", raw, 16, zlib.crc32(raw))
        return bytes(raw)

    mbr = bytearray(SECTOR)
    struct.pack_into("<B3sB3sII", mbr, 446, 0, b"\0\2\0", 0xEE, b"\xff\xff\xff", 1,
                     min(total - 1, 0xFFFFFFFF))  # fmt: skip
    mbr[510:] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.truncate(size)
        for sector, data in [
            (0, bytes(mbr)),
            (1, header(1, total - 1, 2)),
            (2, bytes(array)),
            (total - 1 - array_sectors, bytes(array)),
            (total - 1, header(total - 1, 1, total - 1 - array_sectors)),
        ]:
            f.seek(sector * SECTOR)
            f.write(data)


def _sfdisk(path: Path, script: str) -> None:
    cmd = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", str(path)]
    subprocess.run(cmd, input=script, text=True, check=True, capture_output=True, timeout=30)


@pytest.mark.parametrize("name", ["disk0", "sda1", "nvme0n1", "disk0.img", "vm-7.raw2"])
def test_images_named_with_a_final_digit_keep_their_partition_numbers(
    tmp_path: Path, name: str
) -> None:
    image = tmp_path / name
    image.write_bytes(b"")
    os.truncate(image, 32 << 20)
    _sfdisk(image, "label: gpt\nstart=2048, size=2048\nstart=4096, size=2048\n")
    found = partitions.read_disk(str(image), 32 << 20)
    assert [(p.number, p.start_bytes) for p in found] == [(1, 2048 * SECTOR), (2, 4096 * SECTOR)]


def test_partition_numbers_are_the_table_slots(tmp_path: Path) -> None:
    """Slots 1, 3 and 7 used: p1, p3, p7, also on an image named disk0."""
    for name in ("many", "disk0"):
        write_gpt(tmp_path / name, [0, 2, 6])
        found = partitions.read_disk(str(tmp_path / name), 64 << 20)
        assert [p.number for p in found] == [1, 3, 7], name


def test_sfdisk_names_for_devices_ending_in_a_digit() -> None:
    def table(device: str, nodes: list[str]) -> str:
        parts = [{"node": n, "start": 2048 * (i + 1), "size": 8} for i, n in enumerate(nodes)]
        return json.dumps({"partitiontable": {"label": "gpt", "device": device,
                                              "partitions": parts}})  # fmt: skip

    cases: list[tuple[str, list[str], list[int]]] = [
        ("/srv/disk0", ["/srv/disk0p1", "/srv/disk0p12"], [1, 12]),
        ("sda", ["sda1", "sda3"], [1, 3]),
        ("/dev/disk/by-id/ata-X", ["/dev/disk/by-id/ata-X-part2"], [2]),
        ("x.img", ["x.img1"], [1]),
        ("odd", ["elsewhere9", "elsewhere"], [1, 2]),  # no device prefix: by position
    ]
    for device, nodes, numbers in cases:
        got = [p.number for p in partitions.parse_sfdisk_json(table(device, nodes))]
        assert got == numbers, device
    with pytest.raises(UserError, match="two partitions numbered 1"):
        partitions.parse_sfdisk_json(table("sda", ["sda1", "sda01"]))


def _recording(calls: list[str], active: list[int], peak: list[int]) -> Callable[..., Any]:
    lock = threading.Lock()
    real = partitions.probe

    def probe(image: str, start: int | None = None, size: int | None = None) -> dict[str, str]:
        with lock:
            calls.append(f"{start}")
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.005)
            return real(image, start, size)
        finally:
            with lock:
                active[0] -= 1

    return probe


def test_more_partitions_than_attach_handles_are_refused_before_probing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "many.img"
    write_gpt(image, list(range(200)), entries=256)
    calls: list[str] = []
    monkeypatch.setattr(partitions, "probe", _recording(calls, [0], [0]))
    started = time.monotonic()
    with pytest.raises(UserError) as exc:
        partitions.read_disk(str(image), 64 << 20)
    message = str(exc.value)
    assert message == (
        f"{image}: the partition table lists 200 partitions; backupfs attaches disks of at most 128"
    )
    assert calls == ["None"]  # only the whole disk, to see that it has a table
    assert time.monotonic() - started < 5


def test_probes_run_a_few_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """128 partitions (a full default GPT): all probed, by a bounded pool."""
    image = tmp_path / "full.img"
    write_gpt(image, list(range(128)))
    calls: list[str] = []
    active, peak = [0], [0]
    monkeypatch.setattr(partitions, "probe", _recording(calls, active, peak))
    reading, most_reading, lock, real_pread = [0], [0], threading.Lock(), os.pread

    def pread(fd: int, length: int, offset: int) -> bytes:
        with lock:
            reading[0] += 1
            most_reading[0] = max(most_reading[0], reading[0])
        try:
            time.sleep(0.001)
            return real_pread(fd, length, offset)
        finally:
            with lock:
                reading[0] -= 1

    monkeypatch.setattr(os, "pread", pread)
    threads_before = threading.active_count()
    found = partitions.read_disk(str(image), 64 << 20)
    assert [p.number for p in found] == list(range(1, 129))
    assert all(p.fstype is None for p in found)
    assert len(calls) == 1 + 128
    assert 1 < peak[0] <= 8 and 1 < most_reading[0] <= 8
    assert threading.active_count() == threads_before


def test_a_table_with_no_partitions_says_so(tmp_path: Path) -> None:
    image = tmp_path / "empty.img"
    write_gpt(image, [])
    with pytest.raises(UserError, match="empty.img: its gpt partition table lists no partitions"):
        partitions.read_disk(str(image), 64 << 20)


def test_partitions_past_any_disk_are_refused() -> None:
    part = {"node": "sda1", "start": 1 << 62, "size": 8}
    text = json.dumps({"partitiontable": {"device": "sda", "partitions": [part]}})
    with pytest.raises(UserError, match="cannot read the partition table"):
        partitions.parse_sfdisk_json(text)


@pytest.mark.parametrize(
    ("label", "ptype", "expected"),
    [
        ("dos", "42", "Windows dynamic disk (LDM) volume (not supported)"),
        ("gpt", "AF9B60A0-1431-4F62-BC68-3311714A69AD", "Windows dynamic disk (LDM) volume"),
        ("gpt", "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3", "LDM) volume (not supported): its"),
        ("gpt", "0FC63DAF-8483-4772-8E79-3D69D8477DE4", None),
    ],
)
def test_dynamic_disk_partitions_are_listed_with_their_reason(
    tmp_path: Path, label: str, ptype: str, expected: str | None
) -> None:
    """A table made by the real sfdisk with a Windows dynamic disk (LDM) partition: listed,
    with the reason attach gives, instead of probed as an unknown filesystem."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    os.truncate(disk, 16 << 20)
    script = f"label: {label}\nstart=2048, size=8192, type={ptype}\n"
    sfdisk = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)]
    subprocess.run(sfdisk, input=script, text=True, check=True, capture_output=True, timeout=30)
    out = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                         check=True, timeout=30).stdout  # fmt: skip
    (part,) = partitions.parse_sfdisk_json(out)
    if expected is None:
        assert part.reason is None
    else:
        assert part.reason is not None and expected in part.reason, part.reason


def test_a_hybrid_mbr_is_read_as_its_gpt(tmp_path: Path) -> None:
    """A GPT disk whose MBR also lists its first partition (a hybrid MBR, as gdisk makes
    for old boot loaders): the GPT's two partitions, not the MBR's one."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    os.truncate(disk, 32 << 20)
    _sfdisk(disk, "label: gpt\nstart=2048, size=8192\nstart=10240, size=8192\n")
    with open(disk, "r+b") as f:  # MBR entries: the first partition (0x83), then 0xEE
        f.seek(446)
        f.write(struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), 2048, 8192))
        f.write(struct.pack("<B3sB3sII", 0, bytes(3), 0xEE, bytes(3), 1, 2047))
    found = partitions.read_disk(str(disk), 32 << 20)
    assert [(p.number, p.start_bytes) for p in found] == [(1, 2048 * SECTOR), (2, 10240 * SECTOR)]
