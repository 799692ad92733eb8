"""The VMDK table reader against hostile files, refused with FormatError, quickly: patched
qemu-img images (sparse extent headers, grain directory and grain table entries, compressed
grains and stream footers) and crafted descriptors (extent lines, paths, encodings, sizes)."""

import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest

from backupfs.errors import FormatError
from backupfs.store.formats import local, vmdk
from backupfs.store.formats.base import Extent, Kind
from tests.support.vmdk_images import (
    CHUNK,
    GRAIN,
    SIZE,
    copy_of,
    gd_sector,
    gt_entry,
    map_all,
    open_layer,
    patch,
    stream_with_footer,
)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is not installed"
)
# the fixtures source, sparse and stream: tests/unit/conftest.py


# -- hostile files -----------------------------------------------------------------------------


def refused(path: Path, fragment: str) -> str:
    """Opening `path` and reading all of it is refused, quickly, with `fragment` in the one
    line that names the file."""
    began = time.monotonic()
    with pytest.raises(FormatError) as caught:
        chain = [open_layer(path)]
        for offset in range(0, chain[0].layer.virtual_size, CHUNK):
            local.read_chain(chain, offset, CHUNK)
            opened = chain[0]
            for extent in map_all(opened, offset, min(offset + CHUNK, opened.layer.virtual_size)):
                assert extent.kind in (Kind.DATA, Kind.ZERO, Kind.COMPRESSED)
    message = str(caught.value)
    assert time.monotonic() - began < 5
    assert message.startswith(f"{path.name}: vmdk") and "\n" not in message
    assert fragment in message, message
    return message


# (offset, struct format, value, message fragment): patches of the sparse extent header
HEADER_PATCHES = [
    (0, "4s", b"KDMX", "not a sparse extent nor a descriptor"),
    (4, "<I", 4, "version 4 is not supported"),
    (4, "<I", 0, "version 0 is not supported"),
    (20, "<Q", 100, "grain of 100 sectors is not a power of 2"),
    (20, "<Q", 1 << 20, "is not a power of 2"),
    (20, "<Q", 0, "is not a power of 2"),
    (44, "<I", 256, "grain tables of 256 entries, not 512"),
    (12, "<Q", 1 << 60, "capacity of 1152921504606846976 sectors is absurd"),
    (56, "<Q", 1 << 40, "grain directory at 562949953421312 is outside the file"),
    (56, "<Q", 0, "grain directory at 0 is outside the file"),
    (64, "<Q", 1 << 40, "past the end"),
    (73, "4s", b"\n \n\n", "newline check bytes altered"),
    (77, "<H", 2, "compression 2"),
]


@pytest.mark.parametrize(("offset", "fmt", "value", "fragment"), HEADER_PATCHES)
def test_hostile_headers_are_refused(
    offset: int, fmt: str, value: int | bytes, fragment: str, sparse: Path, tmp_path: Path
) -> None:
    bad = copy_of(sparse, tmp_path)
    patch(bad, fmt, offset, value)
    refused(bad, fragment)


def test_a_capacity_whose_directory_is_over_the_bound(sparse: Path, tmp_path: Path) -> None:
    bad = copy_of(sparse, tmp_path)
    patch(bad, "<QQ", 12, (1 << 46) // 512, 8)  # 64 TiB of 4 KiB grains: a 128 MiB directory
    refused(bad, "grain directory of 134217728 bytes is over the bound")


@pytest.mark.parametrize("where", ["past the end", "on the descriptor", "on the directory"])
def test_hostile_grain_directory_entries(where: str, sparse: Path, tmp_path: Path) -> None:
    bad = copy_of(sparse, tmp_path)
    sector = {"past the end": 0xFFFFFFF0, "on the descriptor": 1}.get(where, gd_sector(bad))
    patch(bad, "<I", gd_sector(bad) * 512, sector)
    refused(bad, f"grain table 0 at sector {sector} is misplaced")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (0xFFFFFF00, "grain at 2199023124480 is outside the grain area"),
        (1, "grain at 512 is outside the grain area"),  # no zeroed-grain flag: the descriptor
        (2, "grain at 1024 is outside the grain area"),
        (0, ""),  # not hostile: the grain reads as zeros
    ],
)
def test_hostile_grain_table_entries(
    value: int, fragment: str, sparse: Path, tmp_path: Path
) -> None:
    bad = copy_of(sparse, tmp_path)
    at, _ = gt_entry(bad, 1)
    patch(bad, "<I", at, value)
    if not fragment:
        assert local.read_chain([open_layer(bad)], GRAIN, GRAIN) == bytes(GRAIN)
        return
    refused(bad, fragment)


def test_a_grain_over_the_grain_directory(source: Path, tmp_path: Path) -> None:
    bad = stream_with_footer(source, tmp_path / "bad.vmdk")  # the directory after the grains
    at, _ = gt_entry(bad, 0)
    patch(bad, "<I", at, gd_sector(bad))
    refused(bad, f"grain at {gd_sector(bad) * 512} is outside the grain area")


LAST = SIZE // GRAIN  # the short last grain, at the end of the stream


@pytest.mark.parametrize(
    ("grain", "lba", "size", "payload", "fragment"),
    [
        (LAST, LAST * 128, 1 << 20, b"", "of 1048576 bytes runs past the end of the file"),
        (0, 0, 1 << 20, b"", "of 1048576 bytes is too large"),
        (0, 0, 0, b"", "is a metadata marker"),
        (0, 128, 100, b"", "is marked for sector 128, not 0"),
        (0, 0, None, zlib.compress(bytes(GRAIN + 1)), "inflates past the grain size"),
        (0, 0, None, zlib.compress(bytes(1000)), "inflates to 1000 bytes, not 65536"),
        (0, 0, None, zlib.compress(bytes(GRAIN))[:10], "ends inside its deflate stream"),
        (0, 0, None, b"\x1f\x8b" + bytes(8), "does not inflate"),
    ],
)
def test_hostile_compressed_grains(
    grain: int, lba: int, size: int | None, payload: bytes, fragment: str, stream: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    bad = copy_of(stream, tmp_path)
    _, sector = gt_entry(bad, grain)
    marker = struct.pack("<QI", lba, len(payload) if size is None else size)
    data = bytearray(bad.read_bytes())
    data[sector * 512 : sector * 512 + len(marker) + len(payload)] = marker + payload
    bad.write_bytes(data)
    refused(bad, fragment)


def test_a_corrupt_grain_is_refused_not_returned(stream: Path, tmp_path: Path) -> None:
    bad = copy_of(stream, tmp_path)
    _, sector = gt_entry(bad, 0)
    size = struct.unpack("<I", bad.read_bytes()[sector * 512 + 8 : sector * 512 + 12])[0]
    data = bytearray(bad.read_bytes())
    data[sector * 512 + 12 + size // 2] ^= 0x55  # the adler-32 does not match any more
    bad.write_bytes(data)
    refused(bad, "does not inflate")


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("footer", "no footer marker"),
        ("eos", "end-of-stream"),
        ("footer header", "grain directory at the end too"),
    ],
)
def test_hostile_footers(where: str, fragment: str, source: Path, tmp_path: Path) -> None:
    bad = stream_with_footer(source, tmp_path / "bad.vmdk")
    end = bad.stat().st_size
    if where == "footer":
        patch(bad, "<I", end - 1536 + 12, 1)
    elif where == "eos":
        patch(bad, "<I", end - 512 + 12, 3)
    else:
        patch(bad, "<Q", end - 1024 + 56, vmdk.GD_AT_END)
    refused(bad, fragment)


def descriptor(tmp_path: Path, *lines: str, name: str = "d.vmdk") -> Path:
    path = tmp_path / name
    head = '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="custom"\n'
    path.write_text(head + "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        (['RW 100 FLAT "../etc/passwd" 0'], "is not in the descriptor's directory"),
        (['RW 100 FLAT "/etc/passwd" 0'], "is not in the descriptor's directory"),
        (['RW 100 SPARSE ".."'], "is not in the descriptor's directory"),
        (['RW 100 FLAT "a\\b" 0'], "is not in the descriptor's directory"),
        (['RW 99999999999999999 FLAT "x" 0'], "extent of 99999999999999999 sectors"),
        (['RW 100000000000 FLAT "x" 0'] * 2000, "more than 64 TiB"),
        (['RW 100 VMFSSPARSE "x"'], "VMFSSPARSE extents are not supported"),
        (['NOACCESS 100 FLAT "x" 0'], "NOACCESS extents are not supported"),
        (['RW 100 FLAT "x"'], "FLAT extent has no offset"),
        (['RW 0 FLAT "x" 0'], "extent of 0 sectors"),
        (['RW 100 FLAT "x" 0', "some garbage"], "line 7 is not understood"),
        (['RW 100 FLAT "x" 0', "parentCID=12345678"], "names no parent file"),
        (["# no extents"], "names no extents"),
    ],
)
def test_hostile_descriptors(lines: list[str], fragment: str, tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(bytes(512 * 100))
    refused(descriptor(tmp_path, *lines), fragment)


def test_descriptor_text_in_its_declared_encoding(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(bytes(51200))
    lines = ['encoding="windows-1252"', 'ddb.comment = "caf\u00e9"', 'RW 100 FLAT "x" 0']
    path = descriptor(tmp_path, *lines)
    path.write_bytes(path.read_text().encode("cp1252"))
    assert open_layer(path).layer.virtual_size == 51200
    assert vmdk.probe(path.read_bytes(), b"", path.stat().st_size)
    path.write_bytes(path.read_bytes().replace(b"windows-1252", b"UTF-8"))
    refused(path, "descriptor is not text in its declared encoding")


def test_a_huge_descriptor_is_refused(tmp_path: Path) -> None:
    path = descriptor(tmp_path, *(['ddb.comment = "' + "x" * 1000 + '"'] * 100))
    assert not vmdk.probe(path.read_bytes()[: 64 << 10], b"", path.stat().st_size)
    refused(path, "descriptor file larger than 64 KiB")


def test_a_descriptor_of_64_tib_of_zeros_maps_at_once(tmp_path: Path) -> None:
    path = descriptor(tmp_path, f"RW {(1 << 46) // 512} ZERO")
    opened = open_layer(path)
    began = time.monotonic()
    assert map_all(opened, 0, 1 << 46) == [Extent(0, 1 << 46, Kind.ZERO)]
    assert local.read_chain([opened], (1 << 46) - 10, 100) == bytes(10)
    assert time.monotonic() - began < 1


def test_a_sparse_extent_unlike_its_descriptor_line(sparse: Path, tmp_path: Path) -> None:
    shutil.copyfile(sparse, tmp_path / "s.vmdk")
    refused(
        descriptor(tmp_path, 'RW 100 SPARSE "s.vmdk"'), "capacity 81926 is not the descriptor's 100"
    )
    shutil.copyfile(tmp_path / "s.vmdk", tmp_path / "t.vmdk")
    patch(tmp_path / "t.vmdk", "<Q", 56, vmdk.GD_AT_END)
    refused(
        descriptor(tmp_path, 'RW 81926 SPARSE "t.vmdk"', name="e.vmdk"),
        "not supported in an extent",
    )


def test_a_short_extent_file(sparse: Path, tmp_path: Path) -> None:
    (tmp_path / "s.vmdk").write_bytes(sparse.read_bytes()[: gd_sector(sparse) * 512 + 4])
    refused(descriptor(tmp_path, 'RW 81926 SPARSE "s.vmdk"'), "grain directory is past the end")


def test_a_delta_without_a_parent_name(sparse: Path, tmp_path: Path) -> None:
    bad = copy_of(sparse, tmp_path)
    data = bytearray(bad.read_bytes())
    at = data.index(b"parentCID=ffffffff")
    data[at : at + 18] = b"parentCID=0badc0de"
    bad.write_bytes(data)
    refused(bad, "delta disk (parentCID 0badc0de) names no parent file")
