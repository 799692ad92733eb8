"""Helpers for the qcow2 reader tests (tests/unit/test_qcow2.py, test_qcow2_hostile.py):
qcow2 images made with qemu-img, the chain of an image and its backing files opened with
the local reader, reads compared with `qemu-img convert -O raw`, and the header, L2 and
compressed-cluster fields of an image found in its bytes, to patch."""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable
from pathlib import Path

from backupfs.store.formats import local
from backupfs.store.formats.base import Extent, Kind
from backupfs.store.formats.qcow2 import Qcow2Layer
from tests.support.qemu import convert_to_raw, qemu_img, sparse_raw

KIB, MIB = 1 << 10, 1 << 20
CHUNK = MIB
RANGES = 1000


def open_chain(path: Path) -> list[local.LocalLayer]:
    """The image and its backing files, top first, following `parent.path` from each
    file's directory."""
    chain = [local.open_local(Qcow2Layer, path)]
    while (parent := chain[-1].layer.parent) is not None:
        assert len(chain) < 8
        chain.append(local.open_local(Qcow2Layer, chain[-1].paths[0].parent / parent.path))
    return chain


def layer_map(opened: local.LocalLayer, start: int, end: int) -> list[Extent]:
    layer = opened.layer
    tables = {read: opened.pread(read) for read in layer.table_reads(start, end)}
    return layer.map(start, end, tables)


def kinds(opened: local.LocalLayer, start: int, end: int) -> set[Kind]:
    return {extent.kind for extent in layer_map(opened, start, end)}


def read_range(path: Path, start: int, size: int) -> bytes:
    return local.read_chain(open_chain(path), start, size)


def random_length(rng: random.Random) -> int:
    return rng.choice([rng.randrange(1, 4 * KIB), rng.randrange(1, 128 * KIB)])


def assert_reads_like_qemu(path: Path, seed: int = 0, ranges: int = RANGES) -> bytes:
    """The whole disk (SHA-256) and `ranges` random ranges equal qemu's raw conversion."""
    raw = convert_to_raw(path)
    chain = open_chain(path)
    size = chain[0].layer.virtual_size
    assert size == len(raw)
    digest = hashlib.sha256()
    for offset in range(0, size, CHUNK):
        digest.update(local.read_chain(chain, offset, CHUNK))
    assert digest.hexdigest() == hashlib.sha256(raw).hexdigest()
    rng = random.Random(seed)
    for _ in range(ranges):
        offset, length = rng.randrange(size), random_length(rng)
        assert local.read_chain(chain, offset, length) == raw[offset : offset + length], (
            offset,
            length,
        )
    return raw


def convert(tmp: Path, name: str, size: int, seed: int, *options: str) -> Path:
    """A qcow2 image by `qemu-img convert` of a sparse raw disk."""
    source = tmp / f"{name}.raw"
    sparse_raw(source, size, seed)
    image = tmp / f"{name}.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *options, source, image)
    source.unlink()
    return image


def create(path: Path, size: str, *options: str, backing: str | None = None) -> Path:
    args = ["create", "-q", "-f", "qcow2", *options]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2"]
    qemu_img(*args, path, size)
    return path


def header(data: bytes | bytearray) -> dict[str, int]:
    cluster_bits, size, _crypt, l1_size, l1_offset = struct.unpack_from(">IQIIQ", data, 20)
    return {"cluster_bits": cluster_bits, "size": size, "l1_size": l1_size, "l1": l1_offset}


def l2_entry_at(data: bytes | bytearray, virtual: int, entry_size: int = 8) -> int:
    """Where in the file the L2 entry of the cluster at `virtual` is."""
    h = header(data)
    bits = h["cluster_bits"]
    per_table = (1 << bits) // entry_size
    l1_index, l2_index = divmod(virtual >> bits, per_table)
    (l1_entry,) = struct.unpack_from(">Q", data, h["l1"] + 8 * l1_index)
    l2: int = l1_entry & 0x00FF_FFFF_FFFF_FE00
    assert l2, f"no L2 table for virtual {virtual:#x}"
    return l2 + l2_index * entry_size


def patched(tmp: Path, source: Path, patch: Callable[[bytearray], None]) -> Path:
    data = bytearray(source.read_bytes())
    patch(data)
    out = tmp / f"patched-{source.name}"
    out.write_bytes(data)
    return out


def compressed_entries(data: bytes | bytearray) -> list[tuple[int, int]]:
    """(virtual offset, L2 entry position) of every compressed cluster of a one-L2 image."""
    h = header(data)
    bits = h["cluster_bits"]
    found = []
    for virtual in range(0, h["size"], 1 << bits):
        at = l2_entry_at(data, virtual)
        (entry,) = struct.unpack_from(">Q", data, at)
        if entry >> 62 & 1:
            found.append((virtual, at))
    return found


def compressed_place(data: bytes | bytearray, entry_at: int) -> tuple[int, int]:
    """(host offset, stored bytes) of the compressed cluster whose L2 entry is at `entry_at`."""
    bits = header(data)["cluster_bits"]
    (entry,) = struct.unpack_from(">Q", data, entry_at)
    x = 62 - (bits - 8)
    host = entry & ((1 << x) - 1)
    sectors = (entry >> x & ((1 << (bits - 8)) - 1)) + 1
    return host, sectors * 512 - host % 512
