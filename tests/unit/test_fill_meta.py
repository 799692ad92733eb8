"""mount.fill_meta: where the fill looks for ext filesystems, from partition tables that
may be hostile (bounded reads, entries outside the disk ignored), and the runs of a block
bitmap, checked against a bit-by-bit model."""

import random
import struct

import pytest

from backupfs.mount import fill_meta

MiB = 1 << 20


class Disk:
    """A sparse disk in memory that counts what is read."""

    def __init__(self, size: int) -> None:
        self.size, self.data, self.read_bytes = size, bytearray(4 * MiB), 0

    def put(self, at: int, raw: bytes) -> None:
        self.data[at : at + len(raw)] = raw

    def read(self, offset: int, n: int) -> bytes:
        self.read_bytes += n
        return bytes(self.data[offset : offset + n]).ljust(
            min(n, max(0, self.size - offset)), b"\0"
        )


def _gpt(disk: Disk, count: int, entry_size: int, starts: list[int], lba: int = 2) -> None:
    header = b"EFI PART" + bytes(64) + struct.pack("<QII", lba, count, entry_size)
    disk.put(512, header)
    for i, start in enumerate(starts):
        entry = b"\x01" * 16 + bytes(16) + struct.pack("<Q", start // 512)
        disk.put(lba * 512 + i * entry_size, entry)


def test_gpt_and_mbr_partitions_are_found() -> None:
    disk = Disk(64 * MiB)
    _gpt(disk, 128, 128, [MiB, 17 * MiB])
    assert fill_meta.partition_starts(disk.read, disk.size) == [MiB, 17 * MiB]
    mbr = Disk(64 * MiB)
    entries = b"".join(
        bytes(4) + bytes([kind]) + bytes(3) + struct.pack("<II", start // 512, 2048)
        for kind, start in ((0x83, MiB), (0x05, 2 * MiB), (0xEE, 3 * MiB), (0x07, 4 * MiB))
    )
    mbr.put(446, entries + b"\x55\xaa")
    assert fill_meta.partition_starts(mbr.read, mbr.size) == [MiB, 4 * MiB]  # no containers


@pytest.mark.parametrize(
    ("count", "entry_size", "lba"),
    [(1 << 31, 128, 2), (128, 127, 2), (128, 1 << 20, 2), (128, 128, 1 << 50), (10**9, 4096, 2)],
)
def test_a_hostile_gpt_costs_bounded_reads(count: int, entry_size: int, lba: int) -> None:
    disk = Disk(64 * MiB)
    _gpt(disk, count, entry_size, [MiB], lba=lba if lba < 100 else 2)
    if lba >= 100:
        disk.put(512 + 72, struct.pack("<Q", lba))
    found = fill_meta.partition_starts(disk.read, disk.size)
    assert disk.read_bytes <= 512 + 128 * 4096
    assert all(0 < s < disk.size for s in found)


def test_entries_outside_the_disk_are_ignored() -> None:
    disk = Disk(64 * MiB)
    _gpt(disk, 4, 128, [MiB, 1 << 40, 0, 64 * MiB])
    assert fill_meta.partition_starts(disk.read, disk.size) == [MiB]


def test_only_starts_with_an_ext_superblock_count() -> None:
    disk = Disk(64 * MiB)
    _gpt(disk, 4, 128, [MiB, 2 * MiB])
    disk.put(2 * MiB + 1080, fill_meta.EXT_MAGIC)
    assert fill_meta.ext_starts(disk.read, disk.size) == [2 * MiB]


def _model(bits: bytes, n: int) -> list[tuple[int, int]]:
    out, start = [], None
    for i in range(n):
        if bits[i >> 3] >> (i & 7) & 1:
            start = i if start is None else start
        elif start is not None:
            out.append((start, i))
            start = None
    return out + ([(start, n)] if start is not None else [])


def test_bitmap_runs_match_a_bit_by_bit_model() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        n = rng.randint(1, 300)
        raw = bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(-(-n // 8)))
        assert fill_meta._set_runs(raw, n) == _model(raw, n), (raw, n)
    assert fill_meta._set_runs(b"\xff" * 4096, 32768) == [(0, 32768)]
    assert fill_meta._set_runs(b"\xff" * 4, 1000) == [(0, 32)]  # a short bitmap: what it has
