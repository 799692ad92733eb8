"""The VHDX reader against qemu-img's dynamic, fixed and sparse VHDXs (also one of more than
one chunk, for the BAT's interleaved sector bitmap entries), differencing VHDXs written by
tests/support/vhdwriter.py (qemu reads none), and the fallback to the second header or
region table when one is corrupt. Hostile VHDXs: tests/unit/test_vhdx_hostile.py."""

from __future__ import annotations

import json
import shutil
import struct
import uuid
from pathlib import Path

import pytest

from backupfs.store.formats import local
from backupfs.store.formats.base import Extent, Kind
from backupfs.store.formats.vhdx import PARTIALLY_PRESENT, VhdxLayer, probe
from tests.support.qemu import (
    assert_reads,
    convert_to_raw,
    mapped,
    qemu_img,
    qemu_io,
    random_ranges,
    raw_file,
)
from tests.support.vhdwriter import (
    MARKER,
    MIB,
    Written,
    make_child_raw,
    make_sparse_raw,
    vhdx_current_header,
    write_differencing_vhdx,
)
from tests.support.vhdx_images import (
    BAT_GUID,
    BIG,
    BLOCK,
    SIZE,
    UNCHANGED,
    bat_entry,
    make_images,
    open_chain,
    region_offset,
)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is not installed"
)


def pread(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


def top(chain: list[local.LocalLayer]) -> VhdxLayer:
    layer = chain[0].layer
    assert isinstance(layer, VhdxLayer)
    return layer


def kinds_by_block(extents: list[Extent], block: int) -> dict[int, set[Kind]]:
    kinds: dict[int, set[Kind]] = {}
    for e in extents:
        for index in range(e.start // block, (e.start + e.length - 1) // block + 1):
            kinds.setdefault(index, set()).add(e.kind)
    return kinds


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The images of `make_images`, made once for the module."""
    return make_images(tmp_path_factory.mktemp("vhdx"))


def written_blocks(images: Path) -> dict[int, str]:
    """The state of each block the writer made present in child.vhdx."""
    return {int(k): v for k, v in json.loads((images / "written.json").read_text()).items()}


def test_probe_finds_the_file_identifier(images: Path) -> None:
    for name in ("dynamic.vhdx", "fixed.vhdx", "child.vhdx"):
        data = pread(images / name, 0, 65536)
        assert probe(data, b"", (images / name).stat().st_size)
    assert not probe(pread(images / "base.raw", 0, 65536), b"", SIZE)
    assert not probe(b"conectix" + bytes(600), b"", 608)


@pytest.mark.parametrize("name", ["dynamic", "fixed", "sparse", "unzeroed"])
def test_reads_what_qemu_reads(images: Path, name: str) -> None:
    chain = open_chain(images / f"{name}.vhdx")
    assert chain[0].layer.parent is None
    expected = convert_to_raw(images / f"{name}.vhdx", "vhdx")
    assert expected == (images / "base.raw").read_bytes()
    assert_reads(chain, expected)


@pytest.mark.parametrize("name", ["sparse", "unzeroed"])
def test_map_over_holes_has_no_data(images: Path, name: str) -> None:
    """qemu's map says all is data; what qemu wrote is known: a 1 MiB block is present
    exactly where base.raw has a non-zero byte, ZERO (or NOT_PRESENT) elsewhere."""
    chain = open_chain(images / f"{name}.vhdx")
    assert top(chain).block_size == MIB
    base = (images / "base.raw").read_bytes()
    with_data = {i for i in range(SIZE // MIB) if any(base[i * MIB : (i + 1) * MIB])}
    kinds = kinds_by_block(chain[0].layer.map(0, SIZE, {}), MIB)
    assert {i for i, k in kinds.items() if k == {Kind.DATA}} == with_data
    assert all(k == {Kind.ZERO} for i, k in kinds.items() if i not in with_data)
    assert all(e.kind is Kind.ZERO for e in chain[0].layer.map(12 * MIB, 20 * MIB, {}))


@pytest.mark.parametrize("state", [1, 2, 3, 5])  # UNDEFINED, ZERO, UNMAPPED (and v0.95's)
def test_block_states_read_as_zeros(images: Path, tmp_path: Path, state: int) -> None:
    data = bytearray((images / "sparse.vhdx").read_bytes())
    bat_entry(0, 8 * MIB | state)(data)
    path = tmp_path / "states.vhdx"
    path.write_bytes(data)
    chain = open_chain(path)
    assert top(chain).map(0, MIB, {}) == [Extent(0, MIB, Kind.ZERO)]
    expected = bytearray((images / "base.raw").read_bytes())
    expected[:MIB] = bytes(MIB)
    assert local.read_chain(chain, 0, SIZE) == expected


def test_bat_interleaves_sector_bitmap_entries(tmp_path: Path) -> None:
    """With 1 MiB blocks a chunk is 4096 blocks: payload entries 0..4095, the chunk's sector
    bitmap entry 4096, then block 4096 at entry 4097 (qemu-io writes, qemu-img reads)."""
    image = tmp_path / "big.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M", image, str(BIG))
    writes = [(10 * MIB, 0x11), (4095 * MIB, 0x22), (4096 * MIB, 0x33), (4100 * MIB + 4096, 0x44)]
    qemu_io(image, *[f"write -P {p:#x} {offset} 65536" for offset, p in writes], fmt="vhdx")
    chain = open_chain(image)
    layer = top(chain)
    assert (layer.virtual_size, layer.chunk_ratio) == (BIG, 4096)
    raw = raw_file(image, image.with_suffix(".qemu.raw"), "vhdx")
    for offset, pattern in writes:
        around = local.read_chain(chain, offset - 4096, 65536 + 8192)
        assert around == bytes(4096) + bytes([pattern]) * 65536 + bytes(4096)
        assert around == pread(raw, offset - 4096, 65536 + 8192)
    bat = region_offset(pread(image, 0, 320 << 10), BAT_GUID)
    states = [e & 7 for e in struct.unpack("<4099Q", pread(image, bat, 4099 * 8))]
    assert (states[4095], states[4096], states[4097]) == (6, 0, 6)  # block, bitmap, block
    assert states[4098] != 6
    kinds = kinds_by_block(layer.map(0, BIG, {}), MIB)
    assert {i for i, k in kinds.items() if Kind.DATA in k} == {10, 4095, 4096, 4100}
    for start, length in random_ranges(BIG, count=300):
        assert local.read_chain(chain, start, length) == pread(raw, start, length)


def test_differencing_chain_reads_the_child(images: Path) -> None:
    chain = open_chain(images / "child.vhdx")
    assert [c.paths[0].name for c in chain] == ["child.vhdx", "dynamic.vhdx"]
    parent = chain[0].layer.parent
    assert parent is not None and parent.path == "./dynamic.vhdx"
    assert parent.uuid == top(chain[1:]).unique_id
    assert parent.uuid == str(
        uuid.UUID(bytes_le=vhdx_current_header(images / "dynamic.vhdx")[32:48])
    )
    expected = (images / "child.raw").read_bytes()
    assert_reads(chain, expected)
    partial = min(i for i, s in written_blocks(images).items() if s == "partial")
    bat = region_offset(pread(images / "child.vhdx", 0, 320 << 10), BAT_GUID)
    (entry,) = struct.unpack("<Q", pread(images / "child.vhdx", bat + 8 * partial, 8))
    assert entry & 7 == PARTIALLY_PRESENT
    careless = pread(images / "child.vhdx", entry >> 20 << 20, BLOCK)  # the bitmap ignored
    assert careless != expected[partial * BLOCK : (partial + 1) * BLOCK]
    assert bytes([MARKER]) * 512 in careless


def test_differencing_map_follows_the_block_states(images: Path) -> None:
    chain = open_chain(images / "child.vhdx")
    blocks = written_blocks(images)
    assert set(blocks.values()) == {"partial", "full", "zero"}
    kinds = kinds_by_block(mapped(chain, 0, SIZE), BLOCK)
    for index, found in kinds.items():
        state = blocks.get(index)
        want = {
            None: {Kind.PARENT},
            "zero": {Kind.ZERO},
            "full": {Kind.DATA},
            "partial": {Kind.DATA, Kind.PARENT},
        }[state]
        assert found == want, (index, state)
    assert {e.kind for e in mapped(chain, *UNCHANGED)} == {Kind.PARENT}


def test_table_reads_ask_only_the_bitmap_piece(images: Path) -> None:
    chain = open_chain(images / "child.vhdx")
    layer = top(chain)
    blocks = written_blocks(images)
    partial = min(i for i, s in blocks.items() if s == "partial")
    start = partial * BLOCK + 8 * 4096
    reads = layer.table_reads(start, start + 4096)
    assert len(reads) == 1 and reads[0].length == 512 and reads[0].offset % 512 == 0
    bitmap = reads[0].offset - reads[0].offset % MIB  # the chunk's 1 MiB bitmap block
    assert reads[0].offset - bitmap == partial * BLOCK // 512 // 8  # block's first bit
    assert layer.table_reads(*UNCHANGED) == []
    full = min(i for i, s in blocks.items() if s == "full")
    assert layer.table_reads(full * BLOCK, full * BLOCK + 4096) == []
    assert open_chain(images / "dynamic.vhdx")[0].layer.table_reads(0, SIZE) == []


def test_differencing_beyond_the_first_chunk(tmp_path: Path) -> None:
    """Blocks of the second chunk: their sector bitmap is the second bitmap block, their
    payload entries come after the first chunk's sector bitmap entry."""
    base_pieces = [(10 * MIB, 100_000), (4095 * MIB, 2 * MIB), (4100 * MIB, 300_000)]
    make_sparse_raw(tmp_path / "base.raw", BIG, base_pieces, seed=4)
    qemu_img("convert", "-f", "raw", "-O", "vhdx", tmp_path / "base.raw", tmp_path / "parent.vhdx")
    pieces = [(10 * MIB + 5000, 700), (4095 * MIB + 5, 3000), (4096 * MIB + 512, 512)]
    pieces += [(4100 * MIB + 1000, 70_000), (4150 * MIB, 4096), (BIG - 512, 512)]
    make_child_raw(tmp_path / "base.raw", tmp_path / "child.raw", pieces, [], seed=5)
    written = write_differencing_vhdx(
        tmp_path / "child.vhdx",
        tmp_path / "parent.vhdx",
        tmp_path / "base.raw",
        tmp_path / "child.raw",
    )
    assert written == Written(
        BLOCK,
        {
            5: "partial",
            2047: "partial",
            2048: "partial",
            2050: "partial",
            2075: "partial",
            2099: "partial",
        },
    )
    chain = open_chain(tmp_path / "child.vhdx")
    reads = chain[0].layer.table_reads(2048 * BLOCK, 2049 * BLOCK)
    assert len(reads) == 1 and reads[0].length == 512
    first_chunk = chain[0].layer.table_reads(5 * BLOCK, 6 * BLOCK)[0]
    assert reads[0].offset - reads[0].offset % MIB != first_chunk.offset - first_chunk.offset % MIB
    child = tmp_path / "child.raw"
    for offset, length in pieces:
        start = max(0, offset - 8192)
        length = min(BIG, offset + length + 8192) - start
        assert local.read_chain(chain, start, length) == pread(child, start, length)
    for start, length in random_ranges(BIG, count=300):
        assert local.read_chain(chain, start, length) == pread(child, start, length)


@pytest.mark.parametrize(
    ("paths", "where", "expected"),
    [
        ({"relative_path": "..\\parents\\p.vhdx"}, "parents/p.vhdx", "../parents/p.vhdx"),
        ({"absolute_win32_path": "ABSOLUTE"}, "p.vhdx", "ABSOLUTE"),
        ({"volume_path": "ABSOLUTE"}, "p.vhdx", "ABSOLUTE"),
    ],
)
def test_parent_paths(
    images: Path, tmp_path: Path, paths: dict[str, str], where: str, expected: str
) -> None:
    parent = tmp_path / where
    parent.parent.mkdir(exist_ok=True)
    shutil.copy(images / "dynamic.vhdx", parent)
    paths = {k: v.replace("ABSOLUTE", str(parent)) for k, v in paths.items()}
    (tmp_path / "children").mkdir()
    child = tmp_path / "children" / "c.vhdx"
    write_differencing_vhdx(child, parent, images / "base.raw", images / "child.raw", paths=paths)
    chain = open_chain(child)
    top = chain[0].layer.parent
    assert top is not None and top.path == expected.replace("ABSOLUTE", str(parent))
    assert local.read_chain(chain, 0, SIZE) == (images / "child.raw").read_bytes()


# -- the header section: headers, log, region tables


def current_header_at(data: bytes | bytearray) -> int:
    seqs = {o: struct.unpack_from("<Q", data, o + 8)[0] for o in (64 << 10, 128 << 10)}
    return max(seqs, key=lambda o: seqs[o])


def test_a_corrupt_current_header_falls_back_to_the_other(images: Path, tmp_path: Path) -> None:
    data = bytearray((images / "sparse.vhdx").read_bytes())
    data[current_header_at(data) + 2000] ^= 1
    path = tmp_path / "one-header.vhdx"
    path.write_bytes(data)
    assert local.read_chain(open_chain(path), 0, SIZE) == (images / "base.raw").read_bytes()


def test_a_corrupt_region_table_falls_back_to_its_copy(images: Path, tmp_path: Path) -> None:
    data = bytearray((images / "sparse.vhdx").read_bytes())
    data[(192 << 10) + 5000] ^= 1
    path = tmp_path / "one-table.vhdx"
    path.write_bytes(data)
    assert local.read_chain(open_chain(path), 0, SIZE) == (images / "base.raw").read_bytes()
