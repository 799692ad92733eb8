"""Helpers for the VHDX reader tests (tests/unit/test_vhdx.py, test_vhdx_hostile.py): the
images both use (qemu-img's conversions of a sparse raw disk and a differencing VHDX written
by tests/support/vhdwriter.py over one of them), a VHDX and its parents opened with the local
reader, and the region table and BAT of an image found in its bytes, to patch."""

from __future__ import annotations

import json
import random
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

from backupfs.store.formats import local
from backupfs.store.formats.vhdx import VhdxLayer
from tests.support.qemu import open_layers, qemu_img
from tests.support.vhdwriter import MIB, make_child_raw, make_sparse_raw, write_differencing_vhdx

SIZE = 48 * MIB
BLOCK = 2 * MIB  # of the differencing files
BASE_PIECES = [
    (0, 300_000),
    (5 * MIB + 777, 70_000),
    (9 * MIB, 2 * MIB),
    (20 * MIB + 100, 3000),
    (40 * MIB, MIB),
    (47 * MIB + 5000, 1536),
]  # holes: 11..20 MiB, 21..40 MiB
UNCHANGED = (22 * MIB, 30 * MIB)  # in child.raw, whole blocks
BIG = 4200 * MIB  # more than a chunk (4 GiB of 512-byte sectors)
BAT_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08").bytes_le
METADATA_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e").bytes_le
FILE_PARAMETERS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b").bytes_le
VIRTUAL_DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8").bytes_le
LOGICAL_SECTOR_SIZE = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f").bytes_le


def open_chain(path: Path) -> list[local.LocalLayer]:
    """The VHDX at `path` and its parents, each found relative to its child's directory."""
    return open_layers(VhdxLayer, path)


def make_images(d: Path) -> Path:
    """base.raw; dynamic.vhdx (qemu's defaults), fixed.vhdx, sparse.vhdx (1 MiB blocks,
    holes ZERO), unzeroed.vhdx (1 MiB blocks, holes NOT_PRESENT) made from it by qemu;
    child.raw (base.raw changed) and child.vhdx over dynamic.vhdx."""
    make_sparse_raw(d / "base.raw", SIZE, BASE_PIECES, seed=1)
    for name, options in [
        ("dynamic", "subformat=dynamic"),
        ("fixed", "subformat=fixed"),
        ("sparse", "block_size=1M"),
        ("unzeroed", "block_size=1M,block_state_zero=off"),
    ]:
        qemu_img(
            "convert", "-f", "raw", "-O", "vhdx", "-o", options, d / "base.raw", d / f"{name}.vhdx"
        )
    rng = random.Random(2)
    scattered = [
        (rng.randrange(SIZE - 5000), rng.choice([512, 700, 4096, 5000])) for _ in range(60)
    ]
    scattered = [(o, n) for o, n in scattered if not UNCHANGED[0] - n < o < UNCHANGED[1]]
    pieces = [*scattered, (30 * MIB, BLOCK), (15 * MIB + 1000, 5000)]
    make_child_raw(d / "base.raw", d / "child.raw", pieces, [(40 * MIB, BLOCK)], seed=3)
    written = write_differencing_vhdx(
        d / "child.vhdx", d / "dynamic.vhdx", d / "base.raw", d / "child.raw"
    )
    (d / "written.json").write_text(json.dumps(written.blocks))
    return d


def regions(head: bytes | bytearray) -> list[tuple[bytes, int, int]]:
    """(GUID, offset, length) of the region table's entries."""
    (count,) = struct.unpack_from("<I", head, (192 << 10) + 8)
    out: list[tuple[bytes, int, int]] = []
    for index in range(count):
        at = (192 << 10) + 16 + 32 * index
        offset, length = struct.unpack_from("<QI", head, at + 16)
        out.append((bytes(head[at : at + 16]), offset, length))
    return out


def region_offset(data: bytes | bytearray, guid: bytes) -> int:
    return next(o for g, o, _ in regions(data) if g == guid)


Patch = Callable[[bytearray], None]


def bat_entry(index: int, value: int) -> Patch:
    def patch(data: bytearray) -> None:
        struct.pack_into("<Q", data, region_offset(data, BAT_GUID) + 8 * index, value)

    return patch
