"""The VHD reader against qemu-img's fixed and dynamic VHDs, differencing VHDs written by
tests/support/vhdwriter.py (qemu reads none), and hostile VHDs patched from real ones."""

from __future__ import annotations

import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from backupfs.errors import FormatError
from backupfs.store.formats import local
from backupfs.store.formats.base import Kind, TableRead
from backupfs.store.formats.vhd import DYNAMIC, VhdLayer, probe
from tests.support.qemu import assert_reads, convert_to_raw, mapped, open_layers, qemu_img, qemu_map
from tests.support.vhdwriter import (
    MARKER,
    MIB,
    make_child_raw,
    make_sparse_raw,
    vhd_checksum,
    write_differencing_vhd,
)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is not installed"
)

SIZE = 48 * MIB + 3 * 512  # not whole 2 MiB blocks, nor a CHS geometry
BLOCK = 2 * MIB
BASE_PIECES = [
    (0, 300_000),
    (5 * MIB + 777, 70_000),
    (9 * MIB, 2 * MIB),
    (20 * MIB + 100, 3000),
    (40 * MIB, MIB),
    (48 * MIB, 1536),
]  # holes: 11..20 MiB, 21..40 MiB
HOLE = (12 * MIB, 20 * MIB)  # in base.raw
UNCHANGED = (22 * MIB, 30 * MIB)  # in child.raw, whole blocks


def open_chain(path: Path) -> list[local.LocalLayer]:
    """The VHD at `path` and its parents, each found relative to its child's directory."""
    return open_layers(VhdLayer, path)


def top(chain: list[local.LocalLayer]) -> VhdLayer:
    layer = chain[0].layer
    assert isinstance(layer, VhdLayer)
    return layer


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base.raw, fixed.vhd and dynamic.vhd made from it by qemu, child.raw (base.raw
    changed) and child.vhd over dynamic.vhd."""
    d = tmp_path_factory.mktemp("vhd")
    make_sparse_raw(d / "base.raw", SIZE, BASE_PIECES, seed=1)
    for sub in ("fixed", "dynamic"):
        qemu_img(
            "convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub},force_size=on",
            d / "base.raw", d / f"{sub}.vhd",
        )  # fmt: skip
    rng = random.Random(2)
    scattered = [
        (rng.randrange(SIZE - 5000), rng.choice([512, 700, 4096, 5000])) for _ in range(60)
    ]
    scattered = [(o, n) for o, n in scattered if not UNCHANGED[0] - n < o < UNCHANGED[1]]
    pieces = [*scattered, (30 * MIB, BLOCK), (15 * MIB + 1000, 5000), (48 * MIB + 512, 100)]
    make_child_raw(d / "base.raw", d / "child.raw", pieces, [(40 * MIB, BLOCK)], seed=3)
    write_differencing_vhd(d / "child.vhd", d / "dynamic.vhd", d / "base.raw", d / "child.raw")
    return d


def test_probe_finds_the_footer_or_its_copy(images: Path) -> None:
    for name in ("fixed.vhd", "dynamic.vhd", "child.vhd"):
        data = (images / name).read_bytes()
        assert probe(data[:65536], data[-65536:], len(data))
    fixed = (images / "fixed.vhd").read_bytes()
    assert probe(fixed[:65536], fixed[-65536:-1], len(fixed) - 1)  # an old 511-byte footer
    raw = (images / "base.raw").read_bytes()
    assert not probe(raw[:65536], raw[-65536:], len(raw))
    assert not probe(b"vhdxfile" + bytes(600), bytes(608), 608)


@pytest.mark.parametrize("name", ["fixed.vhd", "dynamic.vhd"])
def test_reads_what_qemu_reads(images: Path, name: str) -> None:
    chain = open_chain(images / name)
    assert chain[0].layer.virtual_size == SIZE  # footer's current size (force_size=on)
    assert chain[0].layer.parent is None
    expected = convert_to_raw(images / name, "vpc")  # -f vpc: a fixed VHD probes as raw
    assert expected == (images / "base.raw").read_bytes()
    assert_reads(chain, expected)


def test_old_511_byte_footer(images: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.vhd"
    old.write_bytes((images / "fixed.vhd").read_bytes()[:-1])  # its last byte is reserved, 0
    assert_reads(open_chain(old), (images / "base.raw").read_bytes())


def test_dynamic_map_matches_qemu_map(images: Path) -> None:
    """Unallocated blocks are zeros, allocated ones data at qemu's offsets."""
    layer = top(open_chain(images / "dynamic.vhd"))
    extents = layer.map(0, SIZE, {})
    for entry in qemu_map(images / "dynamic.vhd", "vpc"):
        start, end = entry["start"], entry["start"] + entry["length"]
        inside = [e for e in extents if e.start < end and start < e.start + e.length]
        if entry["data"]:
            assert all(e.kind is Kind.DATA for e in inside)
            assert entry["offset"] == inside[0].offset + start - inside[0].start
        else:
            assert all(e.kind is Kind.ZERO for e in inside)
    hole = layer.map(*HOLE, {})
    assert hole and all(e.kind is Kind.ZERO for e in hole)


def test_dynamic_sector_bitmap_is_not_consulted_like_qemu(images: Path, tmp_path: Path) -> None:
    """qemu writes a dynamic block's bitmap all ones and never reads it: a cleared bitmap
    changes nothing in what qemu-img convert outputs, nor in what backupfs reads."""
    data = bytearray((images / "dynamic.vhd").read_bytes())
    (bat_offset,) = struct.unpack_from(">Q", data, 512 + 16)
    (first,) = struct.unpack_from(">I", data, bat_offset)
    assert data[first * 512 : first * 512 + 512] == b"\xff" * 512  # as qemu writes it
    data[first * 512 : first * 512 + 512] = bytes(512)
    cleared = tmp_path / "cleared.vhd"
    cleared.write_bytes(data)
    expected = (images / "base.raw").read_bytes()
    assert convert_to_raw(cleared, "vpc") == expected
    assert local.read_chain(open_chain(cleared), 0, SIZE) == expected


def test_differencing_chain_reads_the_child(images: Path) -> None:
    chain = open_chain(images / "child.vhd")
    assert [c.paths[0].name for c in chain] == ["child.vhd", "dynamic.vhd"]
    parent = chain[0].layer.parent
    assert parent is not None and parent.path == "./dynamic.vhd"
    assert parent.uuid == top(chain[1:]).unique_id
    expected = (images / "child.raw").read_bytes()
    assert_reads(chain, expected)
    careless = open_chain(images / "child.vhd")
    top(careless).disk_type = DYNAMIC  # allocated blocks read whole, the bitmap ignored
    wrong = local.read_chain(careless, 0, SIZE)
    assert wrong != expected and bytes([MARKER]) * 512 in wrong


@pytest.mark.parametrize(
    ("relative", "absolute", "expected"),
    [(False, True, "absolute"), (False, False, "name")],
)
def test_parent_locator_fallbacks(
    images: Path, tmp_path: Path, relative: bool, absolute: bool, expected: str
) -> None:
    shutil.copy(images / "dynamic.vhd", tmp_path / "dynamic.vhd")
    child = tmp_path / "child.vhd"
    write_differencing_vhd(
        child, tmp_path / "dynamic.vhd", images / "base.raw", images / "child.raw",
        relative=relative, absolute=absolute,
    )  # fmt: skip
    chain = open_chain(child)
    parent = chain[0].layer.parent
    assert parent is not None
    path = str((tmp_path / "dynamic.vhd").resolve()) if expected == "absolute" else "dynamic.vhd"
    assert parent.path == path
    whole = local.read_chain(chain, 0, SIZE)
    assert whole == (images / "child.raw").read_bytes()


def test_macx_locator_is_a_file_url(images: Path, tmp_path: Path) -> None:
    """A MacX locator: a UTF-8 file URL, percent-encoded; used when no W2ru/W2ku is."""
    where = tmp_path / "with space"
    where.mkdir()
    shutil.copy(images / "dynamic.vhd", where / "dynamic.vhd")
    data = bytearray((images / "child.vhd").read_bytes())
    url = f"file://localhost{where}/dynamic.vhd".replace(" ", "%20").encode()
    (offset,) = struct.unpack_from(">Q", data, 512 + 576 + 16)
    data[offset : offset + len(url)] = url
    header_field(">4s", 576, b"MacX")(data)
    header_field(">I", 576 + 8, len(url))(data)
    header_field(">4s", 576 + 24, b"Wi2k")(data)  # a deprecated code, not read
    child = tmp_path / "child.vhd"
    child.write_bytes(data)
    chain = open_chain(child)
    parent = chain[0].layer.parent
    assert parent is not None and parent.path == str(where / "dynamic.vhd")
    assert local.read_chain(chain, 0, SIZE) == (images / "child.raw").read_bytes()


def test_differencing_map_kinds(images: Path) -> None:
    chain = open_chain(images / "child.vhd")
    assert {e.kind for e in mapped(chain, *UNCHANGED)} == {Kind.PARENT}  # not present
    around = mapped(chain, 30 * MIB - 512, 32 * MIB + 512)  # a block changed throughout
    assert [e.kind for e in around][1] is Kind.DATA
    assert (around[1].start, around[1].length) == (30 * MIB, BLOCK)
    kinds = {e.kind for e in mapped(chain, 0, SIZE)}
    assert kinds == {Kind.DATA, Kind.PARENT}


def test_table_reads_ask_only_the_bitmap_piece(images: Path) -> None:
    chain = open_chain(images / "child.vhd")
    layer = top(chain)
    start = 30 * MIB + 12 * 4096
    reads = layer.table_reads(start, start + 4096)
    assert len(reads) == 1 and reads[0].length <= 512 and reads[0].offset % 512 == 0
    (bat_offset,) = struct.unpack_from(">Q", chain[0].pread(TableRead(0, 512, 1024)), 16)
    (sector,) = struct.unpack_from(">I", chain[0].pread(TableRead(0, bat_offset + 4 * 15, 4)))
    assert reads[0].offset == sector * 512  # block 15's bitmap, where it begins
    assert open_chain(images / "dynamic.vhd")[0].layer.table_reads(start, start + 4096) == []
    assert open_chain(images / "fixed.vhd")[0].layer.table_reads(start, start + 4096) == []
    assert layer.table_reads(*UNCHANGED) == []  # unallocated blocks: nothing to read


# -- hostile files: each patched so that the check under test is the one that fires

Patch = Callable[[bytearray], None]


def footer_field(fmt: str, at: int, value: int) -> Patch:
    def patch(data: bytearray) -> None:
        struct.pack_into(fmt, data, len(data) - 512 + at, value)
        footer = data[-512:]
        struct.pack_into(">I", data, len(data) - 512 + 64, vhd_checksum(footer, 64))

    return patch


def header_field(fmt: str, at: int, value: int | bytes) -> Patch:
    def patch(data: bytearray) -> None:
        struct.pack_into(fmt, data, 512 + at, value)
        struct.pack_into(">I", data, 512 + 36, vhd_checksum(data[512:1536], 36))

    return patch


def bat_entry(index: int, value: int) -> Patch:
    def patch(data: bytearray) -> None:
        (bat_offset,) = struct.unpack_from(">Q", data, 512 + 16)
        struct.pack_into(">I", data, bat_offset + 4 * index, value)

    return patch


def flip(at: int) -> Patch:
    def patch(data: bytearray) -> None:
        data[at] ^= 0x55

    return patch


def no_footer(data: bytearray) -> None:
    data[-512:-504] = b"notafoot"


DYNAMIC_CASES: list[tuple[str, Patch, str]] = [
    ("footer checksum", flip(-512 + 200), "footer checksum does not match"),
    ("header checksum", flip(512 + 900), "dynamic header checksum does not match"),
    ("no footer", no_footer, "has no footer"),
    ("footer version", footer_field(">I", 12, 0x00020000), "footer version"),
    ("disk type", footer_field(">I", 60, 5), "disk type 5"),
    ("virtual size absurd", footer_field(">Q", 48, 1 << 50), "virtual size"),
    ("virtual size not sectors", footer_field(">Q", 48, SIZE - 100), "virtual size"),
    ("header outside the file", footer_field(">Q", 16, 1 << 40), "dynamic header at offset"),
    ("header cookie", header_field(">8s", 0, b"cxspars_"), "cookie 'cxsparse'"),
    ("block size not a power of two", header_field(">I", 32, 3 * MIB), "block size"),
    ("block size absurd", header_field(">I", 32, 1 << 30), "block size"),
    ("BAT too small", header_field(">I", 28, 3), "BAT has 3 entries, the disk needs 25"),
    ("BAT past the end", header_field(">Q", 16, 1 << 40), "BAT at offset 1099511627776 runs"),
    ("BAT over the header", header_field(">Q", 16, 1024), "overlaps"),
    ("BAT entry past the end", bat_entry(0, 0x7FFFFFFF), "BAT entry 0 points past the end"),
    ("BAT entry into the header", bat_entry(0, 1), "BAT entry 0 points into the headers"),
    ("BAT entry into the BAT", bat_entry(1, 3), "BAT entry 1 points into the headers"),
]


def bat_too_large(data: bytearray) -> None:
    footer_field(">Q", 48, 2000 << 30)(data)
    header_field(">I", 28, 0xFFFFFFFF)(data)
    header_field(">I", 32, 4096)(data)


def locator(index: int, fmt: str, at: int, value: int) -> Patch:
    return header_field(fmt, 576 + 24 * index + at, value)


DIFFERENCING_CASES: list[tuple[str, Patch, str]] = [
    ("locator past the end", locator(0, ">Q", 16, 1 << 40), "parent locator W2ru at offset"),
    ("locator absurd", locator(1, ">I", 8, 1 << 20), "parent locator W2ku of 1048576 bytes"),
    ("locator not UTF-16", locator(0, ">I", 8, 3), "parent locator W2ru is not valid utf-16"),
]


def assert_refused(path: Path, fragment: str) -> None:
    with pytest.raises(FormatError) as caught:
        chain = open_chain(path)
        local.read_chain(chain, 0, chain[0].layer.virtual_size)
    message = str(caught.value)
    assert message.startswith(f"{path.name}: vhd ") and "\n" not in message
    assert fragment in message


@pytest.mark.parametrize(
    ("source", "patch", "fragment"),
    [pytest.param("dynamic.vhd", p, f, id=name) for name, p, f in DYNAMIC_CASES]
    + [pytest.param("dynamic.vhd", bat_too_large, "larger than 32 MiB", id="BAT too large")]
    + [pytest.param("child.vhd", p, f, id=name) for name, p, f in DIFFERENCING_CASES]
    + [
        pytest.param("fixed.vhd", footer_field(">Q", 48, SIZE + MIB), "larger than the file",
                     id="fixed larger than the file"),
        pytest.param("fixed.vhd", footer_field(">I", 60, 3), "dynamic header at offset",
                     id="fixed said dynamic"),
    ],
)  # fmt: skip
def test_hostile_vhd_is_refused(
    images: Path, tmp_path: Path, source: str, patch: Patch, fragment: str
) -> None:
    data = bytearray((images / source).read_bytes())
    patch(data)
    shutil.copy(images / "dynamic.vhd", tmp_path / "dynamic.vhd")
    hostile = tmp_path / f"hostile-{source}"
    hostile.write_bytes(data)
    assert_refused(hostile, fragment)


def test_too_small_a_file_is_refused() -> None:
    with pytest.raises(FormatError, match="too small for a footer"):
        VhdLayer("tiny.vhd", 100)
