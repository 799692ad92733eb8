"""The VMDK table reader against real qemu-img images: every subformat qemu writes, deltas,
a VMware-style stream with its footer, and the allocation map against `qemu-img map`, read
as qemu reads them. Hostile files: tests/unit/test_vmdk_hostile.py."""

import hashlib
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupfs.store.formats import local, vmdk
from backupfs.store.formats.base import Kind, ParentRef
from tests.support.qemu import qemu_img, qemu_io, qemu_map, raw_file
from tests.support.vmdk_images import (
    BIG_SIZE,
    CHUNK,
    GRAIN,
    HOLE,
    SHA_LIMIT,
    SIZE,
    GiB,
    MiB,
    header_of,
    map_all,
    open_layer,
    source_pieces,
    stream_with_footer,
    to_vmdk,
    write_scattered,
)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is not installed"
)
needs_qemu_io = pytest.mark.skipif(
    shutil.which("qemu-io") is None, reason="qemu-io is not installed"
)
# the fixtures source, sparse and stream: tests/unit/conftest.py


# -- reading ----------------------------------------------------------------------------------


def chain_of(path: Path) -> list[local.LocalLayer]:
    """The image and its parents, each parent's hint taken beside the image naming it."""
    chain = [open_layer(path)]
    while (parent := chain[-1].layer.parent) is not None:
        chain.append(open_layer(chain[-1].paths[0].parent / parent.path))
        assert len(chain) < 10
    return chain


def digest(blocks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for block in blocks:
        h.update(block)
    return h.hexdigest()


def chain_blocks(chain: list[local.LocalLayer]) -> Iterator[bytes]:
    size = chain[0].layer.virtual_size
    for offset in range(0, size, CHUNK):
        yield local.read_chain(chain, offset, CHUNK)


def file_blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            yield block


def is_hole(path: Path, offset: int, length: int) -> bool:
    """`[offset, offset + length)` of `path` holds no data (SEEK_DATA): it reads as zeros."""
    with open(path, "rb") as f:
        try:
            return os.lseek(f.fileno(), offset, os.SEEK_DATA) >= offset + length
        except OSError:  # ENXIO: no data after offset
            return True


def zeros_unread(opened: local.LocalLayer, start: int, end: int) -> bool:
    """The layer maps `[start, end)` to zeros, or to holes of its files."""
    for e in map_all(opened, start, end):
        hole = e.kind is Kind.DATA and is_hole(opened.paths[e.file], e.offset, e.length)
        if e.kind is not Kind.ZERO and not hole:
            return False
    return True


def assert_same_chunks(chain: list[local.LocalLayer], raw: Path) -> None:
    """The whole disk, chunk by chunk: those that are holes in qemu's raw copy and that the
    layer maps to zeros or to holes are not read (2 GiB of zeros take seconds to compare)."""
    size = chain[0].layer.virtual_size
    with open(raw, "rb") as f:
        for offset in range(0, size, CHUNK):
            length = min(CHUNK, size - offset)
            unread = len(chain) == 1 and is_hole(raw, offset, length)
            if unread and zeros_unread(chain[0], offset, offset + length):
                continue
            ours = local.read_chain(chain, offset, length)
            assert ours == os.pread(f.fileno(), length, offset), f"chunk at {offset}"


def random_ranges(size: int, hot: list[int], count: int = 1000) -> Iterator[tuple[int, int]]:
    """`count` ranges: half anywhere, half near the offsets in `hot` (where data is)."""
    rng = random.Random(size)
    for i in range(count):
        if i % 2:
            offset = rng.randrange(size)
        else:
            offset = max(0, min(size - 1, rng.choice(hot) + rng.randrange(-GRAIN * 3, GRAIN * 3)))
        yield offset, rng.choice((1, 511, 4096, 65536, 70000, rng.randrange(1, 400 << 10)))


def assert_same_as_qemu(image: Path, tmp: Path, size: int, hot: list[int]) -> None:
    chain = chain_of(image)
    assert chain[0].layer.virtual_size == size
    raw = raw_file(image, tmp / f"{image.stem}.qemu.raw", "vmdk")
    assert raw.stat().st_size == size
    if size <= SHA_LIMIT:
        assert digest(chain_blocks(chain)) == digest(file_blocks(raw))
    else:
        assert_same_chunks(chain, raw)
    with open(raw, "rb") as f:
        for offset, length in random_ranges(size, hot):
            want = os.pread(f.fileno(), length, offset)
            assert local.read_chain(chain, offset, length) == want, (offset, length)


HOT = [offset for offset, _ in source_pieces(random.Random(1), SIZE)]


# -- the subformats qemu writes ------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized", "monolithicFlat"])
def test_monolithic_images_read_as_qemu_reads_them(
    subformat: str, source: Path, tmp_path: Path
) -> None:
    image = to_vmdk(source, tmp_path / "disk.vmdk", subformat)
    assert vmdk.probe(image.read_bytes()[: 64 << 10], b"", image.stat().st_size)
    assert_same_as_qemu(image, tmp_path, SIZE, HOT)
    layer = open_layer(image).layer
    assert layer.parent is None
    assert layer.files == (["disk-flat.vmdk"] if subformat == "monolithicFlat" else [])


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_two_gb_extents_read_as_qemu_reads_them(subformat: str, tmp_path: Path) -> None:
    rng = random.Random(2)
    pieces = [
        (0, rng.randbytes(100_000)),
        (2 * GiB - 70_000, rng.randbytes(140_000)),  # across the two extents
        (BIG_SIZE - 5000, rng.randbytes(5000)),
    ]
    raw = tmp_path / "big.raw"
    write_scattered(raw, BIG_SIZE, pieces)
    image = to_vmdk(raw, tmp_path / "big.vmdk", subformat)
    raw.unlink()
    letter = "s" if subformat.endswith("Sparse") else "f"
    assert open_layer(image).layer.files == [f"big-{letter}001.vmdk", f"big-{letter}002.vmdk"]
    assert_same_as_qemu(image, tmp_path, BIG_SIZE, [offset for offset, _ in pieces])


def test_stream_with_the_directory_in_its_footer(source: Path, tmp_path: Path) -> None:
    image = stream_with_footer(source, tmp_path / "footer.vmdk")
    assert header_of(image)[9] == vmdk.GD_AT_END
    assert_same_as_qemu(image, tmp_path, SIZE, HOT)  # qemu reads the footer too
    assert digest(chain_blocks(chain_of(image))) == digest(file_blocks(source))


def test_the_last_short_grain_of_a_stream_inflates_to_its_length(stream: Path) -> None:
    opened = open_layer(stream)
    layer = opened.layer
    start = SIZE - 100
    extents = layer.map(start, SIZE, {r: opened.pread(r) for r in layer.table_reads(start, SIZE)})
    assert [(e.kind, e.unit_start, e.unit_length) for e in extents] == [
        (Kind.COMPRESSED, SIZE - 3072, 3072)
    ]
    stored = opened.pread(local.TableRead(0, extents[0].offset, extents[0].stored_length))
    assert len(layer.decompress(extents[0], stored)) == 3072


# -- deltas ----------------------------------------------------------------------------------


def cid_of(image: Path) -> str:
    text = image.read_bytes()[512 : 512 + 20 * 512].decode(errors="replace")
    match = re.search(r"^CID=([0-9a-f]+)$", text, re.M)
    assert match is not None
    return match.group(1)


@needs_qemu_io
@pytest.mark.parametrize("zeroed_grain", ["off", "on"])
def test_delta_chains_read_as_qemu_reads_them(
    zeroed_grain: str, source: Path, tmp_path: Path
) -> None:
    base = to_vmdk(source, tmp_path / "base.vmdk", "monolithicSparse")
    delta = tmp_path / "delta.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk",
        "-o", f"zeroed_grain={zeroed_grain}", delta)  # fmt: skip
    qemu_io(
        delta,
        "write -P 0xcd 1000 70000",  # over part of the parent's first grains
        f"write -P 0xce {5 * MiB + 4096} 100",  # a few bytes of a parent grain
        f"write -P 0xcf {HOLE[0] + 12345} 9000",  # where the parent has nothing
        f"write -z {5 * MiB + 2 * GRAIN} {GRAIN}",  # a whole grain of zeros over parent data
        fmt="vmdk",
    )
    top = tmp_path / "top.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "delta.vmdk", "-F", "vmdk", top)
    qemu_io(top, f"write -P 0xd0 {5 * MiB + 100} 200", fmt="vmdk")
    layer = open_layer(delta).layer
    assert layer.parent == ParentRef(path="base.vmdk", uuid=cid_of(base))
    assert [c.paths[0].name for c in chain_of(top)] == ["top.vmdk", "delta.vmdk", "base.vmdk"]
    hot = [*HOT, HOLE[0] + 12345]
    assert_same_as_qemu(top, tmp_path, SIZE, hot)
    assert_same_as_qemu(delta, tmp_path, SIZE, hot)
    zeroed = 5 * MiB + 2 * GRAIN
    kinds = {e.kind for e in map_all(open_layer(delta), zeroed, zeroed + GRAIN)}
    assert kinds == ({Kind.ZERO} if zeroed_grain == "on" else {Kind.DATA})
    assert {e.kind for e in map_all(open_layer(delta), *HOLE)} >= {Kind.PARENT, Kind.DATA}


@needs_qemu_io
def test_a_descriptor_files_delta(source: Path, tmp_path: Path) -> None:
    base = to_vmdk(source, tmp_path / "base.vmdk", "streamOptimized")
    delta = tmp_path / "split.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
        "-b", "base.vmdk", "-F", "vmdk", delta)  # fmt: skip
    qemu_io(delta, "write -P 0xab 5000 100000", f"write -P 0xac {SIZE - 1000} 1000", fmt="vmdk")
    layer = open_layer(delta).layer
    assert layer.files == ["split-s001.vmdk"]
    assert layer.parent == ParentRef(path="base.vmdk", uuid=cid_of(base))
    assert_same_as_qemu(delta, tmp_path, SIZE, [*HOT, 5000])


# -- the allocation map --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sparse", "stream"])
def test_the_map_agrees_with_qemu_img_map(name: str, request: pytest.FixtureRequest) -> None:
    image: Path = request.getfixturevalue(name)
    opened = open_layer(image)
    for entry in qemu_map(image, "vmdk"):
        start, length = int(entry["start"]), int(entry["length"])
        extents = map_all(opened, start, start + length)
        assert sum(e.length for e in extents) == length
        kinds = {e.kind for e in extents}
        if not entry["data"]:
            assert kinds == {Kind.ZERO}, entry
        elif name == "stream":
            assert kinds == {Kind.COMPRESSED}, entry
        else:  # qemu's offsets into the file: ours, merged into one run
            assert [(e.kind, e.offset) for e in extents] == [(Kind.DATA, entry["offset"])]
    assert {e.kind for e in map_all(opened, *HOLE)} == {Kind.ZERO}


def test_contiguous_grains_are_one_extent(sparse: Path) -> None:
    extents = map_all(open_layer(sparse), 5 * MiB, 6 * MiB)
    assert [(e.kind, e.start, e.length) for e in extents] == [(Kind.DATA, 5 * MiB, MiB)]


@pytest.mark.parametrize("name", ["sparse", "stream"])
def test_a_small_read_asks_for_a_few_bytes_of_grain_table(
    name: str, request: pytest.FixtureRequest
) -> None:
    layer = open_layer(request.getfixturevalue(name)).layer
    for offset in (0, 5 * MiB + 1000, GRAIN - 2048, SIZE - 4096):
        reads = layer.table_reads(offset, offset + 4096)
        assert 1 <= len(reads) <= 2 and sum(r.length for r in reads) <= 8, reads
    reads = layer.table_reads(*HOLE)  # qemu writes every grain table: only their slices
    assert sum(r.length for r in reads) == (HOLE[1] - HOLE[0]) // GRAIN * 4


def test_descriptor_with_flat_and_zero_extents(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * 512 * 1024)
    (tmp_path / "a b.bin").write_bytes(data)
    desc = tmp_path / "d.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="custom"\n# Extent description\n'
        'RW 1024 FLAT "a b.bin" 1024\nRDONLY 100 ZERO\nRW 1024 FLAT "a b.bin" 0\n'
    )
    opened = open_layer(desc)
    assert opened.layer.files == ["a b.bin", "a b.bin"]
    want = data[512 * 1024 : 1024 * 1024] + bytes(51200) + data[: 512 * 1024]
    assert local.read_chain([opened], 0, len(want) + 10) == want
    assert vmdk.probe(desc.read_bytes(), b"", desc.stat().st_size)


def test_probe() -> None:
    assert vmdk.probe(b"KDMV" + bytes(508), b"", 512)
    assert vmdk.probe(b"# Disk DescriptorFile\nversion=1\n", b"", 30)
    assert not vmdk.probe(b"# Disk DescriptorFile\n\xff\xfe", b"", 30)
    assert not vmdk.probe(b"# Disk DescriptorFile\n", b"", 1 << 20)
    assert not vmdk.probe(b"QFI\xfb" + bytes(508), b"", 512)
    assert not vmdk.probe(b"COWD" + bytes(508), b"", 512)
