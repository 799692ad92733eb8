"""The qcow2 table reader against qemu: images made with qemu-img and qemu-io read byte for
byte as `qemu-img convert -O raw` reads them (whole disk and 1000 random ranges), the
allocation map agrees with `qemu-img map`, and the table reads ask for slices of the L2
tables. Damaged and hostile images: tests/unit/test_qcow2_hostile.py."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from backupfs.store.formats import local
from backupfs.store.formats.base import Extent, Kind
from backupfs.store.formats.qcow2 import FORMAT, Qcow2Layer, probe
from tests.support.qcow2_images import (
    KIB,
    MIB,
    assert_reads_like_qemu,
    convert,
    create,
    kinds,
    layer_map,
    open_chain,
    patched,
    read_range,
)
from tests.support.qemu import (
    convert_to_raw,
    needs_qemu_img,
    qemu_img,
    qemu_io,
    qemu_map,
    write_bytes,
)

pytestmark = needs_qemu_img


# -- images read as qemu reads them --------------------------------------------------------

CONVERTED = {
    "v3": (32 * MIB + 12800, ["-o", "compat=1.1"]),
    "v2": (32 * MIB + 512, ["-o", "compat=0.10"]),
    "cluster-512": (8 * MIB + 1536, ["-o", "cluster_size=512"]),
    "cluster-2M": (64 * MIB, ["-o", "cluster_size=2M"]),
    "zlib": (24 * MIB + 4096, ["-c"]),
    "zstd": (24 * MIB + 4096, ["-c", "-o", "compression_type=zstd"]),
    "zlib-512": (4 * MIB, ["-c", "-o", "cluster_size=512"]),
    "zstd-512": (2 * MIB, ["-c", "-o", "compression_type=zstd,cluster_size=512"]),
    "zstd-2M": (32 * MIB, ["-c", "-o", "compression_type=zstd,cluster_size=2M"]),
    "v2-zlib": (8 * MIB, ["-c", "-o", "compat=0.10"]),
    "extended-l2": (16 * MIB + 1024, ["-o", "extended_l2=on,cluster_size=128k"]),
}


@pytest.mark.parametrize("case", sorted(CONVERTED))
def test_converted_image_reads_like_qemu(tmp_path: Path, case: str) -> None:
    size, options = CONVERTED[case]
    image = convert(tmp_path, case, size, len(case), *options)
    assert_reads_like_qemu(image, seed=len(case))
    opened = local.open_local(Qcow2Layer, image)
    assert opened.layer.parent is None and opened.layer.files == []
    assert opened.layer.format == FORMAT
    if "z" in case:  # compressed images do hold compressed clusters (and plain ones)
        assert Kind.COMPRESSED in kinds(opened, 0, size)


def test_zero_clusters_read_as_zeros(tmp_path: Path) -> None:
    image = convert(tmp_path, "zeros", 16 * MIB, 7, "-o", "compat=1.1")
    data_at = 1 * MIB
    qemu_io(
        image,
        f"write -q -P 0x5a {data_at} 512k",
        f"write -q -z {data_at} 128k",  # whole clusters: the zero flag, the cluster kept
        f"write -q -z -u {data_at + 256 * KIB} 64k",  # unmapped
        f"write -q -z {data_at + 400 * KIB} 1000",  # part of a cluster: zeros written
    )
    raw = assert_reads_like_qemu(image)
    assert raw[data_at : data_at + 128 * KIB] == bytes(128 * KIB)
    assert kinds(local.open_local(Qcow2Layer, image), data_at, data_at + 128 * KIB) == {Kind.ZERO}


def test_v2_zero_writes(tmp_path: Path) -> None:
    image = convert(tmp_path, "v2zeros", 8 * MIB, 8, "-o", "compat=0.10")
    qemu_io(image, "write -q -P 0x11 0 1M", "write -q -z 64k 192k", "write -q -z 700k 3000")
    assert_reads_like_qemu(image)


def test_extended_l2_subclusters(tmp_path: Path) -> None:
    image = create(tmp_path / "ext.qcow2", "16M", "-o", "extended_l2=on,cluster_size=128k")
    qemu_io(image, "write -q -P 0xab 4096 4096")
    assert image.stat().st_size % (128 * KIB) != 0  # qemu leaves the last cluster short
    rng = random.Random(3)
    write_bytes(image, 200_000, rng.randbytes(5000))
    write_bytes(image, 3 * MIB, rng.randbytes(300 * KIB))
    qemu_io(
        image,
        f"write -q -z {3 * MIB + 8 * KIB} 8k",  # zero subclusters inside an allocated cluster
        "write -q -z 8M 16k",  # zero subclusters of an unallocated cluster
        "write -q -P 0x17 9M 128k",
    )
    assert_reads_like_qemu(image)
    opened = local.open_local(Qcow2Layer, image)
    assert kinds(opened, 0, 128 * KIB) == {Kind.ZERO, Kind.DATA}
    assert kinds(opened, 8 * MIB, 8 * MIB + 16 * KIB) == {Kind.ZERO}


def test_extended_l2_over_a_backing_file(tmp_path: Path) -> None:
    base = convert(tmp_path, "base", 8 * MIB, 11)
    top = create(
        tmp_path / "top.qcow2", "8M", "-o", "extended_l2=on,cluster_size=64k", backing="base.qcow2"
    )
    rng = random.Random(4)
    for offset in (0, 70_000, 1 * MIB + 4096, 5 * MIB + 100):
        write_bytes(top, offset, rng.randbytes(rng.randrange(1, 20_000)))
    qemu_io(top, "write -q -z 2M 4k", "write -q -z 6M 64k")
    assert_reads_like_qemu(top)
    opened = local.open_local(Qcow2Layer, top)
    assert kinds(opened, 0, 64 * KIB) == {Kind.DATA, Kind.PARENT}
    assert kinds(opened, 2 * MIB, 2 * MIB + 4096) == {Kind.ZERO}
    assert base.exists()


def test_three_deep_chain(tmp_path: Path) -> None:
    days = [tmp_path / day for day in ("2026-11-01", "2026-11-02", "2026-11-03")]
    for day in days:
        day.mkdir()
    base = convert(days[0], "disk0", 24 * MIB, 21)
    mid = create(days[1] / "disk0.qcow2", "24M", backing="../2026-11-01/disk0.qcow2")
    top = create(days[2] / "disk0.qcow2", "24M", backing="../2026-11-02/disk0.qcow2")
    rng = random.Random(5)
    for layer in (mid, top):
        qemu_io(layer, f"write -q -c {rng.randrange(300) * 64 * KIB} 64k")  # compressed
        for _ in range(12):  # partial overwrites of the parent's clusters, and whole ones
            length = rng.randrange(1, 200_000)
            write_bytes(layer, rng.randrange(24 * MIB - length), rng.randbytes(length))
        qemu_io(
            layer,
            f"write -q -z {rng.randrange(20) * MIB} 256k",  # zeros hiding the parent's data
            f"write -q -z {rng.randrange(24 * MIB - 5000)} 5000",
        )
    assert_reads_like_qemu(top, seed=1)
    chain = open_chain(top)
    assert [c.paths[0].resolve() for c in chain] == [day / "disk0.qcow2" for day in days[::-1]]
    assert chain[0].layer.parent is not None
    assert chain[0].layer.parent.path == "../2026-11-02/disk0.qcow2"
    assert chain[0].layer.parent.format_hint == "qcow2"
    assert base.exists()


def test_backing_file_smaller_than_the_overlay(tmp_path: Path) -> None:
    convert(tmp_path, "small", 4 * MIB + 512, 31)
    top = create(tmp_path / "big.qcow2", "12M", backing="small.qcow2")
    rng = random.Random(6)
    write_bytes(top, 4 * MIB - 3000, rng.randbytes(6000))  # straddles the parent's end
    write_bytes(top, 7 * MIB, rng.randbytes(70_000))
    qemu_io(top, "write -q -P 0x33 1M 4k")
    raw = assert_reads_like_qemu(top)
    assert raw[5 * MIB : 6 * MIB] == bytes(MIB)


def test_absolute_backing_path(tmp_path: Path) -> None:
    base = convert(tmp_path, "abs-base", 4 * MIB, 41)
    top = create(tmp_path / "abs-top.qcow2", "4M", backing=str(base))
    write_bytes(top, 12345, random.Random(7).randbytes(100_000))
    assert_reads_like_qemu(top, ranges=200)
    parent = local.open_local(Qcow2Layer, top).layer.parent
    assert parent is not None and parent.path == str(base)


def test_raw_backing_format_hint(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MIB))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "1M")
    parent = local.open_local(Qcow2Layer, top).layer.parent
    assert parent is not None and (parent.path, parent.format_hint) == ("base.raw", "raw")


def test_internal_snapshots_are_ignored(tmp_path: Path) -> None:
    image = convert(tmp_path, "snap", 8 * MIB, 51)
    qemu_img("snapshot", "-c", "before", image)
    write_bytes(image, 100_000, random.Random(8).randbytes(300_000))
    qemu_io(image, "write -q -z 2M 1M")
    qemu_img("snapshot", "-c", "after", image)
    qemu_io(image, "write -q -P 0x44 5M 64k")
    assert_reads_like_qemu(image, ranges=300)


def test_dirty_image_reads(tmp_path: Path) -> None:
    image = convert(tmp_path, "dirty", 4 * MIB, 61)
    raw = convert_to_raw(image)
    dirty = patched(tmp_path, image, lambda d: struct.pack_into(">Q", d, 72, 1))
    assert read_range(dirty, 0, len(raw)) == raw


# -- the allocation map and the table reads ------------------------------------------------


def test_map_of_holes_matches_qemu_map(tmp_path: Path) -> None:
    image = convert(tmp_path, "holes", 32 * MIB, 71)
    opened = local.open_local(Qcow2Layer, image)
    entries = qemu_map(image)
    assert any(not e["data"] for e in entries) and any(e["data"] for e in entries)
    for entry in entries:
        got = kinds(opened, entry["start"], entry["start"] + entry["length"])
        assert got == ({Kind.DATA} if entry["data"] else {Kind.ZERO}), entry


def test_map_of_an_overlay_matches_qemu_map(tmp_path: Path) -> None:
    convert(tmp_path, "under", 16 * MIB, 72)
    top = create(tmp_path / "over.qcow2", "16M", backing="under.qcow2")
    write_bytes(top, 3 * MIB, random.Random(9).randbytes(MIB))
    qemu_io(top, "write -q -z 8M 1M")
    opened = local.open_local(Qcow2Layer, top)
    for entry in qemu_map(top):
        got = kinds(opened, entry["start"], entry["start"] + entry["length"])
        if entry["depth"] > 0 or not entry["present"]:
            assert got == {Kind.PARENT}, entry
        elif entry["data"]:
            assert got == {Kind.DATA}, entry
        else:
            assert got == {Kind.ZERO}, entry


def test_table_reads_ask_for_a_slice_of_the_l2_table(tmp_path: Path) -> None:
    image = convert(tmp_path, "slices", 16 * MIB, 81)
    layer = local.open_local(Qcow2Layer, image).layer
    rng = random.Random(10)
    for _ in range(200):
        start = rng.randrange(16 * MIB - 4096)
        reads = layer.table_reads(start, start + 4096)
        assert sum(r.length for r in reads) <= 16 and all(r.length % 8 == 0 for r in reads)
    extended = convert(tmp_path, "slices-ext", 4 * MIB, 82, "-o", "extended_l2=on")
    reads = local.open_local(Qcow2Layer, extended).layer.table_reads(8192, 12288)
    assert [r.length for r in reads] == [16]


def test_contiguous_data_maps_to_one_extent(tmp_path: Path) -> None:
    image = create(tmp_path / "contiguous.qcow2", "8M")
    data = random.Random(11).randbytes(4 * MIB)
    write_bytes(image, 0, data)
    opened = local.open_local(Qcow2Layer, image)
    extents = layer_map(opened, 1 * MIB, 2 * MIB)
    assert len(extents) == 1 and extents[0].kind is Kind.DATA
    assert [r.length for r in opened.layer.table_reads(MIB, 2 * MIB)] == [16 * 8]
    assert local.read_chain([opened], MIB + 77, MIB) == data[MIB + 77 : 2 * MIB + 77]
    assert layer_map(opened, 5 * MIB, 8 * MIB) == [Extent(5 * MIB, 3 * MIB, Kind.ZERO)]


def test_probe(tmp_path: Path) -> None:
    image = create(tmp_path / "probe.qcow2", "1M")
    head = image.read_bytes()[: 64 * KIB]
    assert probe(head, head, image.stat().st_size)
    assert not probe(bytes(512), bytes(512), 512)
    assert not probe(b"QFI", b"QFI", 3)
