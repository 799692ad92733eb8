"""Helpers for the VMDK reader tests (tests/unit/test_vmdk.py, test_vmdk_hostile.py): the
scattered source disk and its qemu-img conversions, a VMware-style stream with its grain
directory in a footer (which qemu-img does not write), the header and grain table fields of
an image found in its bytes, to patch, and a VMDK opened and mapped with the local reader."""

import os
import random
import shutil
import struct
import zlib
from pathlib import Path

from backupfs.store.formats import local, vmdk
from backupfs.store.formats.base import Extent
from backupfs.store.formats.vmdk import VmdkLayer
from tests.support.qemu import qemu_img

MiB, GiB = 1 << 20, 1 << 30
SIZE = 40 * MiB + 3072  # not a whole number of grains: the last grain is short
GRAIN = 64 << 10
HOLE = (20 * MiB, 30 * MiB)  # no data in the source image there
BIG_SIZE = 2 * GiB + 8 * MiB + 1024  # two twoGbMaxExtent extents
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
CHUNK = 8 * MiB
SHA_LIMIT = 256 * MiB  # bigger disks are compared chunk by chunk


def write_scattered(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            os.pwrite(f.fileno(), data, offset)


def source_pieces(rng: random.Random, size: int) -> list[tuple[int, bytes]]:
    """Random data at scattered offsets, with a long hole and a short last grain."""
    return [
        (0, rng.randbytes(300 << 10)),
        (5 * MiB, rng.randbytes(MiB)),  # sequential grains: contiguous in a sparse file
        (10 * MiB + 1234, rng.randbytes(5000)),  # across a grain boundary
        (17 * MiB - 100, rng.randbytes(300)),
        (33 * MiB, bytes([7]) * 200_000),  # compresses well
        (size - 2000, rng.randbytes(2000)),  # in the short last grain
    ]


def to_vmdk(raw: Path, out: Path, subformat: str) -> Path:
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, out)
    return out


def copy_of(image: Path, tmp_path: Path, name: str = "bad.vmdk") -> Path:
    out = tmp_path / name
    shutil.copyfile(image, out)
    return out


def patch(path: Path, fmt: str, offset: int, *values: int | bytes) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(data)


def header_of(path: Path, offset: int = 0) -> tuple[int | bytes, ...]:
    with open(path, "rb") as f:
        return HEADER.unpack(os.pread(f.fileno(), HEADER.size, offset))


def gd_sector(path: Path) -> int:
    """Where the grain directory is, as the header or else the footer says."""
    sector = int(header_of(path)[9])
    if sector == vmdk.GD_AT_END:
        sector = int(header_of(path, path.stat().st_size - 1024)[9])
    return sector


def gt_sector(path: Path, gt: int = 0) -> int:
    with open(path, "rb") as f:
        return int(struct.unpack("<I", os.pread(f.fileno(), 4, gd_sector(path) * 512 + gt * 4))[0])


def gt_entry(path: Path, grain: int) -> tuple[int, int]:
    """(file offset of the entry, its value) of grain number `grain`."""
    at = gt_sector(path, grain // 512) * 512 + (grain % 512) * 4
    with open(path, "rb") as f:
        return at, int(struct.unpack("<I", os.pread(f.fileno(), 4, at))[0])


def stream_with_footer(raw: Path, out: Path) -> Path:
    """A VMware-style streamOptimized file: grains, then grain tables and the directory each
    behind a marker, the header again in a footer (the first says GD_AT_END), end-of-stream."""
    data, sectors = raw.read_bytes(), raw.stat().st_size // 512
    n_grains = -(-len(data) // GRAIN)
    gd = [0] * -(-n_grains // 512)
    tables: dict[int, list[int]] = {}
    body = bytearray()

    def header(gd_at: int) -> bytes:
        fields = (b"KDMV", 3, 0x30001, sectors, 128, 1, 20, 512, 0, gd_at, 128, 0, b"\n \r\n", 1)
        return HEADER.pack(*fields).ljust(512, b"\0")

    def sector_now() -> int:
        return 128 + len(body) // 512

    def marker(n: int, kind: int) -> bytes:
        return struct.pack("<QII", n, 0, kind).ljust(512, b"\0")

    for grain in range(n_grains):
        chunk = data[grain * GRAIN : (grain + 1) * GRAIN]
        if chunk.count(0) == len(chunk):
            continue
        tables.setdefault(grain // 512, [0] * 512)[grain % 512] = sector_now()
        packed = zlib.compress(chunk)
        body += struct.pack("<QI", grain * 128, len(packed)) + packed
        body += bytes(-len(body) % 512)
    for gt, entries in sorted(tables.items()):
        body += marker(4, 1)
        gd[gt] = sector_now()
        body += struct.pack("<512I", *entries)
    gd_bytes = struct.pack(f"<{len(gd)}I", *gd)
    body += marker(-(-len(gd_bytes) // 512), 2)
    gd_at = sector_now()
    body += gd_bytes + bytes(-len(gd_bytes) % 512)
    descriptor = (
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="streamOptimized"\n\nRW {sectors} SPARSE "{out.name}"\n'
    ).encode()
    head = header(vmdk.GD_AT_END) + descriptor.ljust(20 * 512, b"\0")
    head = head.ljust(128 * 512, b"\0")
    out.write_bytes(head + body + marker(1, 3) + header(gd_at) + marker(0, 0))
    return out


def open_layer(path: Path) -> local.LocalLayer:
    return local.open_local(VmdkLayer, path)


def map_all(opened: local.LocalLayer, start: int, end: int) -> list[Extent]:
    layer = opened.layer
    return layer.map(start, end, {r: opened.pread(r) for r in layer.table_reads(start, end)})
