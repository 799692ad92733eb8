"""The qcow2 table reader against damaged and hostile images (real qemu-img images,
patched): bad headers and feature bits, truncated files, bad L1/L2 and data cluster
offsets, bad subcluster bitmaps, and zlib and zstd clusters that inflate wrong or past
their size, are refused with a FormatError naming the file, never read wrong."""

from __future__ import annotations

import random
import resource
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from backupfs.errors import FormatError
from backupfs.store.formats import local
from backupfs.store.formats.base import Kind, TableRead
from backupfs.store.formats.qcow2 import Qcow2Layer
from tests.support.qcow2_images import (
    KIB,
    MIB,
    compressed_entries,
    compressed_place,
    convert,
    create,
    header,
    l2_entry_at,
    layer_map,
    open_chain,
    patched,
    read_range,
)
from tests.support.qemu import convert_to_raw, needs_qemu_img, qemu_img, qemu_io, write_bytes

pytestmark = needs_qemu_img


# -- hostile and damaged images ---------------------------------------------------------


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A v3 image with 64 KiB clusters: data in its first 256 KiB and at 3 MiB."""
    tmp = tmp_path_factory.mktemp("victim")
    image = create(tmp / "victim.qcow2", "4M")
    rng = random.Random(12)
    write_bytes(image, 0, rng.randbytes(256 * KIB))
    write_bytes(image, 3 * MIB, rng.randbytes(100 * KIB))
    return image


@pytest.fixture(scope="module")
def zlib_victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(tmp_path_factory.mktemp("zlib"), "zlib-victim", 4 * MIB, 13, "-c")


@pytest.fixture(scope="module")
def zstd_victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("zstd")
    return convert(tmp, "zstd-victim", 4 * MIB, 14, "-c", "-o", "compression_type=zstd")


@pytest.fixture(scope="module")
def overlay_victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("overlay")
    create(tmp / "base.qcow2", "4M")
    return create(tmp / "overlay.qcow2", "4M", backing="base.qcow2")


def refused(path: Path, match: str) -> None:
    with pytest.raises(FormatError, match=match) as caught:
        open_chain(path)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(path.name)


def read_refused(path: Path, start: int, size: int, match: str) -> None:
    chain = open_chain(path)  # opening is fine: the damage is in a table read on demand
    with pytest.raises(FormatError, match=match) as caught:
        local.read_chain(chain, start, size)
    assert str(caught.value).startswith(path.name)


def put(fmt: str, at: int, *values: int | bytes) -> Callable[[bytearray], None]:
    return lambda data: struct.pack_into(fmt, data, at, *values)


HEADER_PATCHES = {
    "bad magic": (put(">4s", 0, b"QFI\x00"), "bad magic"),
    "version 1": (put(">I", 4, 1), "version 1"),
    "version 4": (put(">I", 4, 4), "version 4"),
    "cluster_bits 8": (put(">I", 20, 8), "cluster_bits 8"),
    "cluster_bits 22": (put(">I", 20, 22), "cluster_bits 22"),
    "size 2**63": (put(">Q", 24, 1 << 63), "virtual size .* absurd"),
    "size 2**64-1": (put(">Q", 24, (1 << 64) - 1), "virtual size .* absurd"),
    "size 2**62": (put(">Q", 24, 1 << 62), "L1 table of .* larger than"),
    "l1_size 2**31": (put(">I", 36, 1 << 31), "L1 table of 2147483648 entries"),
    "l1_size 2**32-1": (put(">I", 36, (1 << 32) - 1), "L1 table of 4294967295 entries"),
    "l1_size too small": (put(">Q", 24, 2 * 1024 * MIB), "too small"),
    "l1 past the end": (put(">Q", 40, 1 << 40), "L1 table .* past the end"),
    "l1 unaligned": (put(">Q", 40, 0x30008), "L1 table offset .* not a valid cluster"),
    "l1 in the header": (put(">Q", 40, 0), "L1 table offset 0x0 is not a valid cluster"),
    "encrypted (AES)": (put(">I", 32, 1), "encrypted"),
    "corrupt": (put(">Q", 72, 2), "marked corrupt"),
    "external data file": (put(">Q", 72, 4), "external data file"),
    "unknown feature": (put(">Q", 72, 1 << 5), "incompatible feature bit 5 is not supported"),
    "unknown high feature": (put(">Q", 72, 1 << 63), "incompatible feature bit 63"),
    "zstd bit, zlib type": (put(">Q", 72, 8), "does not match"),
    "zstd type, no bit": (put(">B", 104, 1), "does not match"),
    "compression type 2": (put(">B", 104, 2), "compression type 2 is not supported"),
    "header_length 96": (put(">I", 100, 96), "header_length 96"),
    "header_length past cluster": (put(">I", 100, 1 << 20), "header_length 1048576"),
    "extension past area": (put(">I", 116, 1 << 20), "runs past the extension area"),
    "backing past cluster": (put(">QI", 8, 65530, 20), "outside the first cluster"),
    "backing too long": (put(">QI", 8, 1024, 1024), "1024 bytes is too long"),
    "backing in header": (put(">QI", 8, 8, 20), "outside the first cluster"),
}


@pytest.mark.parametrize("case", sorted(HEADER_PATCHES))
def test_hostile_header_is_refused(tmp_path: Path, victim: Path, case: str) -> None:
    patch, match = HEADER_PATCHES[case]
    refused(patched(tmp_path, victim, patch), match)


def test_truncated_files_are_refused(tmp_path: Path, victim: Path) -> None:
    data = victim.read_bytes()
    for size, match in ((0, "empty"), (50, "truncated"), (90, "truncated")):
        short = tmp_path / f"short-{size}.qcow2"
        short.write_bytes(data[:size])
        refused(short, match)


def test_huge_l1_is_refused_before_anything_is_read(victim: Path) -> None:
    data = bytearray(victim.read_bytes())
    struct.pack_into(">IQ", data, 36, 1 << 31, 0x30000)
    layer = Qcow2Layer("huge.qcow2", 1 << 40)
    (read,) = layer.open_reads()
    assert read.length <= 64 * KIB
    with pytest.raises(FormatError, match="L1 table of 2147483648 entries"):
        layer.load(read, bytes(data[read.offset : read.offset + read.length]))


def test_unknown_feature_is_named_from_the_feature_table(tmp_path: Path, victim: Path) -> None:
    def rename_dirty_bit(data: bytearray) -> None:
        at = data.index(b"dirty bit") - 2  # the feature table entry (type 0, bit 0)
        data[at + 1] = 9
        data[at + 2 : at + 48] = b"frobnication".ljust(46, b"\0")
        struct.pack_into(">Q", data, 72, 1 << 9)

    refused(patched(tmp_path, victim, rename_dirty_bit), r"bit 9 \(frobnication\)")


def test_real_luks_image_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "luks.qcow2"
    # qemu-img times its key derivation and fails now and then on this VM ("Unable to get
    # accurate CPU usage", a quarter of the runs measured): try again, a few times.
    for attempt in range(8):
        try:
            qemu_img(
                "create", "-q", "--object", "secret,id=sec0,data=123456", "-f", "qcow2",
                "-o", "encrypt.format=luks,encrypt.key-secret=sec0", image, "1M",
            )  # fmt: skip
            break
        except subprocess.CalledProcessError as exc:
            if "accurate CPU usage" not in exc.stderr or attempt == 7:
                raise
    refused(image, "encrypted")


def test_real_external_data_file_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "external.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", image, "1M")
    refused(image, "external data file")


def test_extended_l2_with_small_clusters_is_refused(tmp_path: Path) -> None:
    image = create(tmp_path / "small.qcow2", "1M", "-o", "cluster_size=512")
    refused(patched(tmp_path, image, put(">Q", 72, 16)), "extended L2 entries with clusters of 512")


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("past the end", "past the end of the file"),
        ("unaligned", "not aligned"),
        ("the L1 itself", "overlaps the L1 table"),
    ],
)
def test_bad_l2_table_offset(tmp_path: Path, victim: Path, case: str, match: str) -> None:
    data = victim.read_bytes()
    l1 = header(data)["l1"]
    value = {"past the end": 1 << 40, "unaligned": 0x50200, "the L1 itself": l1}[case]
    bad = patched(tmp_path, victim, put(">Q", l1, value | 1 << 63))
    read_refused(bad, 100, 10, match)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (1 << 40, "data cluster .* past the end of the file"),
        (0x50200, "not aligned"),
        (None, "overlaps the L1 table"),
    ],
)
def test_bad_data_cluster_offset(
    tmp_path: Path, victim: Path, value: int | None, match: str
) -> None:
    data = victim.read_bytes()
    raw = convert_to_raw(victim)
    host = header(data)["l1"] if value is None else value
    bad = patched(tmp_path, victim, put(">Q", l2_entry_at(data, 128 * KIB), host | 1 << 63))
    read_refused(bad, 128 * KIB + 5, 10, match)
    read_refused(bad, 0, MIB, match)
    assert read_range(bad, 0, 128 * KIB) == raw[: 128 * KIB]  # the rest still reads right
    assert read_range(bad, 3 * MIB, 64 * KIB) == raw[3 * MIB : 3 * MIB + 64 * KIB]


def test_data_cluster_cut_short_by_the_end_of_file(tmp_path: Path, victim: Path) -> None:
    data = victim.read_bytes()
    (entry,) = struct.unpack_from(">Q", data, l2_entry_at(data, 3 * MIB + 64 * KIB))
    host = entry & 0x00FF_FFFF_FFFF_FE00
    assert host + 64 * KIB == len(data)  # the last cluster of the file
    short = tmp_path / "short.qcow2"
    short.write_bytes(data[: host + 1000])
    assert (
        read_range(short, 3 * MIB + 64 * KIB, 1000)
        == convert_to_raw(victim)[3 * MIB + 64 * KIB : 3 * MIB + 64 * KIB + 1000]
    )
    read_refused(short, 3 * MIB + 64 * KIB, 1001, "cut short by the end of the file")


def test_zero_flag_in_a_v2_image_is_refused(tmp_path: Path) -> None:
    image = create(tmp_path / "v2.qcow2", "2M", "-o", "compat=0.10")
    qemu_io(image, "write -q -P 0x62 0 64k")
    data = image.read_bytes()
    at = l2_entry_at(data, 0)
    (entry,) = struct.unpack_from(">Q", data, at)
    read_refused(patched(tmp_path, image, put(">Q", at, entry | 1)), 0, 10, "v2 image")


@pytest.mark.parametrize(
    ("bitmap", "host", "match"),
    [(1 | 1 << 32, None, "both allocated and zero"), (1, 0, "without a host cluster")],
)
def test_bad_subcluster_bitmaps(tmp_path: Path, bitmap: int, host: int | None, match: str) -> None:
    image = create(tmp_path / "sub.qcow2", "1M", "-o", "extended_l2=on")
    qemu_io(image, "write -q -P 0x61 0 4k")
    data = image.read_bytes()
    at = l2_entry_at(data, 0, entry_size=16)
    (entry,) = struct.unpack_from(">Q", data, at)
    value = entry if host is None else host
    read_refused(patched(tmp_path, image, put(">QQ", at, value, bitmap)), 0, 10, match)


def test_compressed_cluster_inflating_past_its_size(tmp_path: Path, zlib_victim: Path) -> None:
    data = zlib_victim.read_bytes()
    virtual, at = compressed_entries(data)[0]
    host, stored = compressed_place(data, at)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb = deflate.compress(bytes(64 * KIB + 1)) + deflate.flush()
    assert len(bomb) <= stored
    bad = patched(
        tmp_path, zlib_victim, lambda d: d.__setitem__(slice(host, host + len(bomb)), bomb)
    )
    read_refused(bad, virtual, 10, "inflates past its cluster size")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ("short", "less than a cluster"),
        ("garbage", "does not inflate"),
    ],
)
def test_compressed_cluster_that_does_not_inflate_right(
    tmp_path: Path, zlib_victim: Path, payload: str, match: str
) -> None:
    data = zlib_victim.read_bytes()
    virtual, at = compressed_entries(data)[0]
    host, _stored = compressed_place(data, at)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -12)
    blob = deflate.compress(bytes(1000)) + deflate.flush() if payload == "short" else b"\xff" * 64
    bad = patched(
        tmp_path, zlib_victim, lambda d: d.__setitem__(slice(host, host + len(blob)), blob)
    )
    read_refused(bad, virtual, 10, match)


@pytest.mark.parametrize(
    ("host", "match"),
    [(1 << 50, "past the end of the file"), (1000, "in the header cluster")],
)
def test_compressed_descriptor_out_of_place(
    tmp_path: Path, zlib_victim: Path, host: int, match: str
) -> None:
    data = zlib_victim.read_bytes()
    virtual, at = compressed_entries(data)[0]
    (entry,) = struct.unpack_from(">Q", data, at)
    x = 62 - (header(data)["cluster_bits"] - 8)
    value = (entry & ~((1 << x) - 1)) | host
    read_refused(patched(tmp_path, zlib_victim, put(">Q", at, value)), virtual, 10, match)


def test_compressed_extents_end_on_a_sector(zlib_victim: Path) -> None:
    opened = local.open_local(Qcow2Layer, zlib_victim)
    units = [e for e in layer_map(opened, 0, 4 * MIB) if e.kind is Kind.COMPRESSED]
    assert units and all((e.offset + e.stored_length) % 512 == 0 for e in units)
    assert any(e.offset % 512 for e in units)  # qemu packs them, not sector-aligned
    assert all(e.unit_length == 64 * KIB and e.unit_start % (64 * KIB) == 0 for e in units)


def test_compressed_length_is_clipped_to_the_file(tmp_path: Path, zlib_victim: Path) -> None:
    data = zlib_victim.read_bytes()
    raw = convert_to_raw(zlib_victim)
    places = {
        compressed_place(data, at)[0]: (virtual, at) for virtual, at in compressed_entries(data)
    }
    virtual, at = places[max(places)]  # the compressed cluster stored last in the file
    (entry,) = struct.unpack_from(">Q", data, at)
    x = 62 - (header(data)["cluster_bits"] - 8)
    value = entry | (0xFF << x)  # 256 sectors: past the end of the file
    bad = patched(tmp_path, zlib_victim, put(">Q", at, value))
    (extent,) = layer_map(local.open_local(Qcow2Layer, bad), virtual, virtual + 10)
    assert extent.offset + extent.stored_length == len(data)
    assert read_range(bad, virtual, 64 * KIB) == raw[virtual : virtual + 64 * KIB]


def zstd_rle_bomb(blocks: int, content_size: int | None) -> bytes:
    """A zstd frame of `blocks` RLE blocks of 64 KiB each (4 bytes apiece)."""
    if content_size is None:
        frame = struct.pack("<IBB", 0xFD2FB528, 0, (16 - 10) << 3)  # window 64 KiB
    else:
        frame = struct.pack("<IBBQ", 0xFD2FB528, 3 << 6, (16 - 10) << 3, content_size)
    for index in range(blocks):
        last = 1 if index == blocks - 1 else 0
        frame += (last | 1 << 1 | (64 * KIB) << 3).to_bytes(3, "little") + b"\x00"
    return frame


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ("declared too big", "inflates past its cluster size"),
        ("bomb of unknown size", "inflates past its cluster size"),
        ("bomb declared small", "does not inflate"),
        ("short", "less than a cluster|does not inflate"),
        ("cut short", "cut short|does not inflate"),
        ("garbage", "does not inflate"),
    ],
)
def test_zstd_cluster_that_does_not_inflate_right(
    tmp_path: Path, zstd_victim: Path, payload: str, match: str
) -> None:
    data = zstd_victim.read_bytes()
    virtual, at = compressed_entries(data)[0]
    host, stored = compressed_place(data, at)
    blob = {
        "declared too big": lambda: zstandard.ZstdCompressor().compress(bytes(128 * KIB)),
        "bomb of unknown size": lambda: zstd_rle_bomb(stored // 4 - 4, None),
        "bomb declared small": lambda: zstd_rle_bomb(stored // 4 - 10, 64 * KIB),
        "short": lambda: zstandard.ZstdCompressor().compress(bytes(1000)),
        "cut short": lambda: zstandard.ZstdCompressor().compress(random.randbytes(64 * KIB))[:50],
        "garbage": lambda: b"\xff" * 64,
    }[payload]()
    assert len(blob) <= stored
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bad = patched(
        tmp_path, zstd_victim, lambda d: d.__setitem__(slice(host, host + len(blob)), blob)
    )
    read_refused(bad, virtual, 10, match)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB


def three_frames(cluster: bytes) -> bytes:
    """`cluster` as three zstd frames, the middle one without its content size."""
    sized, unsized = zstandard.ZstdCompressor(), zstandard.ZstdCompressor(write_content_size=False)
    return (
        sized.compress(cluster[:1000])
        + struct.pack("<II", 0x184D2A53, 3)
        + b"abc"  # a skippable frame
        + unsized.compress(cluster[1000:40_000])
        + sized.compress(cluster[40_000:])
        + b"\xee" * 7  # what follows in the last sector is ignored
    )


def test_zstd_cluster_of_several_frames_reads(tmp_path: Path, zstd_victim: Path) -> None:
    data = zstd_victim.read_bytes()
    raw = convert_to_raw(zstd_victim)
    fits = [
        (virtual, *compressed_place(data, at))
        for virtual, at in compressed_entries(data)
        if len(three_frames(raw[virtual : virtual + 64 * KIB])) <= compressed_place(data, at)[1]
    ]
    virtual, host, _stored = fits[0]
    cluster = raw[virtual : virtual + 64 * KIB]
    blob = three_frames(cluster)
    bad = patched(
        tmp_path, zstd_victim, lambda d: d.__setitem__(slice(host, host + len(blob)), blob)
    )
    assert read_range(bad, virtual, 64 * KIB) == cluster


def test_backing_name_must_be_utf8_and_in_the_file(tmp_path: Path, overlay_victim: Path) -> None:
    data = overlay_victim.read_bytes()
    offset, size = struct.unpack_from(">QI", data, 8)
    assert data[offset : offset + size] == b"base.qcow2"
    refused(patched(tmp_path, overlay_victim, put(">B", offset, 0xFF)), "not UTF-8")
    refused(patched(tmp_path, overlay_victim, put(">B", offset + 2, 0)), "NUL byte")
    short = tmp_path / "short-overlay.qcow2"
    short.write_bytes(data[: offset + 3])
    refused(short, "past the end of the file")


def test_map_needs_the_tables_it_asked_for(victim: Path) -> None:
    opened = local.open_local(Qcow2Layer, victim)
    (read,) = opened.layer.table_reads(0, 4096)
    with pytest.raises(FormatError, match="L2 table at .* missing"):
        opened.layer.map(0, 4096, {})
    with pytest.raises(FormatError, match="L2 table at .* 4 of 8 bytes"):
        opened.layer.map(0, 4096, {read: bytes(4)})
    with pytest.raises(ValueError):
        opened.layer.map(0, opened.layer.virtual_size + 1, {})


def test_load_refuses_reads_it_did_not_ask_for() -> None:
    layer = Qcow2Layer("x.qcow2", 1 << 20)
    with pytest.raises(FormatError, match="did not ask for"):
        layer.load(TableRead(0, 512, 512), bytes(512))
