"""attach.lvm: a physical volume made by the real lvm2 tools (on a loop device over a file,
without device-mapper) read back in userspace, and crafted labels, metadata areas and
texts refused with one line, in bounded time and memory."""

import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from backupfs.attach import lvm
from backupfs.attach.lvm import LvmError

MiB = 1 << 20
LVM = ["--driverloaded", "n", "--config", "backup { backup = 0 archive = 0 }"]
needs_lvm = pytest.mark.skipif(shutil.which("pvcreate") is None, reason="lvm2 is not installed")


def _run(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def pv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lvm") / "pv.img"
    _run("truncate", "-s", "64M", str(path))
    device = _run("losetup", "-f", "--show", str(path)).strip()
    try:
        _run("pvcreate", *LVM, "-q", device)
        _run("vgcreate", *LVM, "-q", "vgt", device)
        _run("lvcreate", *LVM, "-q", "-an", "-Zn", "-n", "one", "-L", "8M", "vgt")
        _run("lvcreate", *LVM, "-q", "-an", "-Zn", "-n", "two", "-L", "12M", "vgt")
    finally:
        _run("losetup", "-d", device)
    return path


def _read(path: Path, data: bytes | None = None) -> Callable[[int, int], bytes]:
    blob = data if data is not None else path.read_bytes()
    return lambda offset, size: blob[offset : offset + size]


@needs_lvm
def test_a_real_volume_group_is_read_where_lvm_put_it(pv: Path) -> None:
    pv_id, text = lvm.read_metadata(_read(pv), pv.stat().st_size)
    found = {v.name: v for v in lvm.volumes(text, pv_id, pv.stat().st_size)}
    assert set(found) == {"vgt-one", "vgt-two"}
    # pe_start 1 MiB, extents of 4 MiB: one at extents 0-1, two at 2-4
    assert (found["vgt-one"].start_bytes, found["vgt-one"].size_bytes) == (MiB, 8 * MiB)
    assert (found["vgt-two"].start_bytes, found["vgt-two"].size_bytes) == (9 * MiB, 12 * MiB)
    assert all(v.skipped is None for v in found.values())


def _patched(pv: Path, at: int, data: bytes) -> bytes:
    blob = bytearray(pv.read_bytes()[: 2 * MiB])
    blob[at : at + len(data)] = data
    return bytes(blob)


@needs_lvm
@pytest.mark.parametrize(
    ("at", "data", "message"),
    [
        (512 + 40, b"X", "label checksum does not match"),
        (4096 + 4, b"X", "metadata area header is damaged"),
    ],
)
def test_damaged_labels_and_headers_are_refused(
    pv: Path, at: int, data: bytes, message: str
) -> None:
    with pytest.raises(LvmError, match=message):
        lvm.read_metadata(_read(pv, _patched(pv, at, data)), 64 * MiB)


@needs_lvm
def test_a_changed_metadata_text_is_refused(pv: Path) -> None:
    blob = pv.read_bytes()[: 2 * MiB]
    header = blob[4096 : 4096 + 512]
    offset, size = struct.unpack_from("<QQ", header, 40)
    at = 4096 + offset + size // 2
    flipped = blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :]
    with pytest.raises(LvmError, match="metadata checksum does not match"):
        lvm.read_metadata(_read(pv, flipped), 64 * MiB)


def test_no_label_is_refused() -> None:
    with pytest.raises(LvmError, match="no LVM label"):
        lvm.read_metadata(lambda offset, size: bytes(size), 64 * MiB)


def _vg(lv: str, pe_start: int = 2048, extent_size: int = 8192) -> str:
    pvs = f'physical_volumes {{ pv0 {{ id = "ab-cd" pe_start = {pe_start} }} }}'
    return f'vg {{ id = "x" extent_size = {extent_size} {pvs} logical_volumes {{ {lv} }} }}'


LINEAR = 'lv { status = ["READ", "VISIBLE"] segment1 { start_extent = 0 extent_count = %s ' \
    'type = "striped" stripe_count = 1 stripes = ["pv0", %s] } }'  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_vg(LINEAR % (1 << 40, 0)), "lies past the end of its physical volume"),
        (_vg(LINEAR % (2, 1 << 40)), "lies past the end of its physical volume"),
        (_vg(LINEAR % (2, 0), extent_size=0), "extent_size is not a positive integer"),
        (_vg(LINEAR % (-5, 0)), "extent_count is not a positive integer"),
        ("a { " * 100 + "}" * 100, "nests too deeply"),
        ("x = 1 " * 100_000, "too long"),
        ("vg { id = ", "ends after '='"),
        ("vg { id = 1", "ends inside a section"),
        ("vg { } }", "stray"),
        (_vg(" ".join(f"l{n} {{ }}" for n in range(300))), "too many logical volumes"),
        (_vg("").replace('"ab-cd"', '"other"'), "not in its own volume group"),
    ],
)
def test_hostile_metadata_is_refused_with_one_line(text: str, message: str) -> None:
    with pytest.raises(LvmError, match=message) as info:
        lvm.volumes(text, "abcd", 64 * MiB)
    assert "\n" not in str(info.value)


def test_volumes_that_are_not_one_linear_range_say_why() -> None:
    two = LINEAR.replace("segment1", "segment1") % (1, 0)
    two = two[:-1] + ' segment2 { start_extent = 1 extent_count = 1 type = "striped" ' \
        'stripe_count = 1 stripes = ["pv0", 5] } }'  # fmt: skip
    thin = 'lv { status = ["VISIBLE"] segment1 { type = "thin" extent_count = 1 } }'
    other = LINEAR.replace('"pv0", %s', '"pv1", %s') % (1, 0)
    for lv, reason in ((two, "2 segments"), (thin, "a thin volume"), (other, "another physical")):
        (found,) = lvm.volumes(_vg(lv), "abcd", 64 * MiB)
        assert found.skipped is not None and reason in found.skipped, (lv, found)


def test_lvm_crc_is_lvms() -> None:
    # LVM's calc_crc of "123456789" from its initial value (computed by lvm2's algorithm).
    crc = 0xF597A6CF
    for byte in b"123456789":
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    assert lvm.lvm_crc(b"123456789") == crc
