"""attach.lvm: a volume group made by the real lvm2 tools (on loop devices over two files,
without device-mapper: volumes of several segments, striped over both) read back in
userspace where lvs says they are, and crafted labels, metadata areas and texts refused
with one line, in bounded time and memory."""

import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupfs.attach import lvm
from backupfs.attach.lvm import LvmError

MiB = 1 << 20
EXTENT = 4 * MiB  # lvm2's default extent size
LVM = ["--driverloaded", "n", "--config", "backup { backup = 0 archive = 0 }"]
needs_lvm = pytest.mark.skipif(shutil.which("pvcreate") is None, reason="lvm2 is not installed")


def _run(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@dataclass(frozen=True)
class Group:
    """A volume group over two physical volumes (files), and what lvm2 says of it."""

    pvs: tuple[Path, Path]
    ids: tuple[str, str]  # of the PVs, without dashes, as their labels hold them
    pe_start: int  # bytes, the same on both
    extent_bytes: int
    # lvs: each segment as (LV, first extent in the LV, extents, ((PV index, first PE), ...))
    segments: tuple[tuple[str, int, int, tuple[tuple[int, int], ...]], ...]
    stripe_bytes: dict[tuple[str, int], int]  # (LV, first extent) -> lvs' stripe_size


def _report(args: list[str], *fields: str) -> list[list[str]]:
    columns = ",".join(fields)
    out = _run(*args, "--noheadings", "--separator", "|", "--units", "b", "-o", columns)
    return [line.strip().split("|") for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Group:
    """vgt on two 64 MiB files: one (8 MiB, then 4 MiB more after two), two (12 MiB),
    str (16 MiB in 64 KiB stripes over both). lvm2 sees only these two loop devices."""
    where = tmp_path_factory.mktemp("lvm")
    paths = (where / "pv.img", where / "pv2.img")
    devices: list[str] = []
    try:
        for path in paths:
            _run("truncate", "-s", "64M", str(path))
            devices.append(_run("losetup", "-f", "--show", str(path)).strip())
        a, b = devices
        lvm_ = ["--devices", f"{a},{b}", *LVM, "-q"]
        new = ["lvcreate", *lvm_, "-an", "-Zn"]
        _run("pvcreate", *lvm_, a, b)
        _run("vgcreate", *lvm_, "vgt", a, b)
        _run(*new, "-n", "one", "-L", "8M", "vgt", a)
        _run(*new, "-n", "two", "-L", "12M", "vgt", a)
        _run("lvextend", *lvm_, "-L", "+4M", "vgt/one", a)  # lvextend has no -an
        _run(*new, "-n", "str", "-i", "2", "-I", "64k", "-L", "16M", "vgt", a, b)
        pvs = _report(["pvs", *lvm_], "pv_name", "pv_uuid", "pe_start", "vg_extent_size")
        fields = ("lv_name", "seg_start_pe", "seg_size_pe", "seg_pe_ranges", "stripe_size")
        lvs = _report(["lvs", *lvm_, "vgt"], *fields)
    finally:
        for device in devices:
            _run("losetup", "-d", device)
    index = {row[0]: devices.index(row[0]) for row in pvs}
    ids = {index[row[0]]: row[1].replace("-", "") for row in pvs}
    ((pe_start, extent),) = {(int(r[2].rstrip("B")), int(r[3].rstrip("B"))) for r in pvs}
    segments, stripes = [], {}
    for name, first, count, ranges, stripe in lvs:
        areas = []
        for item in ranges.split():
            device, extents = item.rsplit(":", 1)
            areas.append((index[device], int(extents.split("-")[0])))
        segments.append((name, int(first), int(count), tuple(areas)))
        stripes[name, int(first)] = int(stripe.rstrip("B"))
    return Group(paths, (ids[0], ids[1]), pe_start, extent, tuple(segments), stripes)


@pytest.fixture(scope="module")
def pv(group: Group) -> Path:
    return group.pvs[0]


def _read(path: Path, data: bytes | None = None) -> Callable[[int, int], bytes]:
    blob = data if data is not None else path.read_bytes()
    return lambda offset, size: blob[offset : offset + size]


def _expected(group: Group) -> dict[str, list[lvm.Segment]]:
    """The segments lvs reports, in bytes, by volume."""
    out: dict[str, list[lvm.Segment]] = {}
    for name, first, count, places in sorted(group.segments, key=lambda s: s[:2]):
        size = count * group.extent_bytes
        stripe = group.stripe_bytes[name, first] or size  # lvs: 0 for a linear segment
        areas = [
            lvm.Area(group.ids[i], group.pe_start + pe * group.extent_bytes) for i, pe in places
        ]
        out.setdefault(f"vgt-{name}", []).append(lvm.Segment(size, stripe, tuple(areas)))
    return out


@needs_lvm
def test_a_real_volume_group_is_read_where_lvm_put_it(group: Group) -> None:
    pv_id, text = lvm.read_metadata(_read(group.pvs[0]), 64 * MiB)
    assert pv_id == group.ids[0]
    found = {v.name: v for v in lvm.volumes(text, pv_id, 64 * MiB)}
    assert set(found) == {"vgt-one", "vgt-two", "vgt-str"}
    assert all(v.skipped is None for v in found.values())
    assert (group.pe_start, group.extent_bytes) == (MiB, EXTENT)
    # one at extents 0-1, two at 2-4, one's 4 MiB more at 5, str at 6-7 and 0-1 of pv2
    assert (found["vgt-two"].contiguous, found["vgt-two"].size_bytes) == (
        lvm.Area(pv_id, 9 * MiB),
        12 * MiB,
    )
    one = found["vgt-one"]
    assert one.contiguous is None and one.size_bytes == 12 * MiB
    assert one.segments == (
        lvm.Segment(8 * MiB, 8 * MiB, (lvm.Area(pv_id, MiB),)),
        lvm.Segment(4 * MiB, 4 * MiB, (lvm.Area(pv_id, 21 * MiB),)),
    )
    striped = found["vgt-str"]
    assert striped.contiguous is None and striped.size_bytes == 16 * MiB
    (seg,) = striped.segments
    assert seg.stripe_bytes == 64 << 10 and lvm.area_bytes(seg) == 8 * MiB
    assert seg.areas == (lvm.Area(pv_id, 25 * MiB), lvm.Area(group.ids[1], MiB))
    assert striped.pv_ids == set(group.ids)
    # ... and all of it is what lvs reports
    assert {name: list(v.segments) for name, v in found.items()} == _expected(group)


@needs_lvm
def test_each_physical_volume_of_the_group_gives_the_same_volumes(group: Group) -> None:
    read = [lvm.read_metadata(_read(path), 64 * MiB) for path in group.pvs]
    assert [pv_id for pv_id, _ in read] == list(group.ids)
    first, second = (lvm.volumes(text, pv_id, 64 * MiB) for pv_id, text in read)
    assert first == second


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


PV0 = 'pv0 { id = "ab-cd" pe_start = 2048 }'
PV1 = 'pv1 { id = "ef-gh" pe_start = 2048 pe_count = 4 }'


def _vg(lv: str, pe_start: int = 2048, extent_size: int = 8192, pvs: str = "") -> str:
    pv0 = PV0.replace("2048", str(pe_start))
    pvs = f"physical_volumes {{ {pv0} {pvs} }}"
    return f'vg {{ id = "x" extent_size = {extent_size} {pvs} logical_volumes {{ {lv} }} }}'


LINEAR = 'lv { status = ["READ", "VISIBLE"] segment1 { start_extent = 0 extent_count = %s ' \
    'type = "striped" stripe_count = 1 stripes = ["pv0", %s] } }'  # fmt: skip


def _seg(n: int, start: int, count: int, *areas: tuple[str, int], stripe_size: int = 128) -> str:
    """segment<n> of `count` extents from `start`, striped (linear: one area) over `areas`."""
    stripes = ", ".join(f'"{pv}", {first}' for pv, first in areas)
    return (
        f'segment{n} {{ start_extent = {start} extent_count = {count} type = "striped" '
        f"stripe_count = {len(areas)} stripe_size = {stripe_size} stripes = [{stripes}] }}"
    )


def _lv(name: str, *segments: str, visible: bool = True) -> str:
    status = '["READ", "VISIBLE"]' if visible else '["READ"]'
    return f"{name} {{ status = {status} {' '.join(segments)} }}"


def _many_areas() -> str:
    """MAX_AREAS + 128 areas: 129 segments, each striped over 128 PVs (so the overlap check
    of each PV has little to compare)."""
    pvs = " ".join(f'p{j} {{ id = "p{j}" pe_start = 2048 }}' for j in range(128))
    segs = [_seg(k + 1, 128 * k, 128, *((f"p{j}", k) for j in range(128))) for k in range(129)]
    return _vg(_lv("lv", *segs), pvs=pvs)


def _stripes_of(count: int, pairs: int) -> str:
    seg = _seg(1, 0, count, *(("pv0", 2 * k) for k in range(pairs)))
    return _vg(_lv("lv", seg.replace(f"stripe_count = {pairs}", f"stripe_count = {count}")))


ONE = _seg(1, 0, 2, ("pv0", 0))
SEGMENTS = [
    (_vg(LINEAR % (1 << 40, 0)), "lies past the end of its physical volume"),
    (_vg(LINEAR % (2, 1 << 40)), "lies past the end of its physical volume"),
    (_vg(LINEAR % (2, 0), extent_size=0), "extent_size is not a positive integer"),
    (_vg(LINEAR % (-5, 0)), "extent_count is not a positive integer"),
    # volumes sharing extents, also with a hidden one (a snapshot's origin, say)
    (_vg(_lv("a", ONE) + _lv("b", _seg(1, 0, 2, ("pv0", 1)))), "share extents"),
    (_vg(_lv("a", ONE) + _lv("b", ONE, visible=False)), "share extents"),
    (_vg(_lv("a", ONE, _seg(2, 2, 1, ("pv0", 1)))), "share extents"),  # with itself
    (_vg(_lv("a", _seg(1, 0, 1, ("pv0", 0)), _seg(2, 2, 1, ("pv0", 5)))), "leave a gap"),
    (_vg(_lv("a", _seg(1, 0, 2, ("pv0", 0)), _seg(2, 1, 1, ("pv0", 5)))), "overlap or"),
    (_vg(_lv("a", _seg(1, 0, 1, ("pv0", 0)), _seg(2, 0, 1, ("pv0", 5)))), "overlap or"),
    (_vg(_lv("a", _seg(1, 1, 1, ("pv0", 0)))), "overlap or leave a gap"),
    (_vg(_lv("a", ONE.replace("start_extent = 0", "start_extent = -1"))), "start_extent"),
    (_vg(_lv("a", *(_seg(k, k, 1, ("pv0", k)) for k in range(1025)))), "more than 1024 seg"),
    (_vg(_lv("a", *(_seg(k, k, 1, ("pv0", k)) for k in range(10_000)))), "too long"),
    (_stripes_of(129, 129), "its stripes are not 129 "),
    (_stripes_of(10_000, 10_000), "its stripes are not 10000 "),
    (_stripes_of(2, 1), "its stripes are not 2 "),
    (_stripes_of(2, 3), "its stripes are not 2 "),
    (_vg(_lv("a", ONE.replace('["pv0", 0]', '"pv0"'))), "its stripes are not 1 "),
    (_vg(_lv("a", _seg(1, 0, 3, ("pv0", 0), ("pv0", 9)))), "3 extents do not split into 2"),
    (_vg(_lv("a", _seg(1, 0, 2, ("pv0", 0), ("pv0", 9), stripe_size=3))), "do not split"),
    (_vg(_lv("a", _seg(1, 0, 2, ("pv0", 0), ("pv0", 9), stripe_size=0))), "stripe_size"),
    (_vg(_lv("a", _seg(1, 0, 2, ("pv1", 3))), pvs=PV1), "past the end of its physical"),
    (_vg(_lv("a", _seg(1, 0, 2, ("pv0", 0), ("pv1", 4))), pvs=PV1), "past the end of its"),
    (_vg(_lv("a", ONE), pvs=PV1.replace("= 4", '= "4"')), "pe_count of pv1 is not a count"),
    (_vg(_lv("a", _seg(1, 0, 2, ("pv9", 0)))), "names a physical volume the group lacks"),
    (_vg(_lv("a", _seg(1, 0, 2, ("pv0", -1)))), "names a physical volume the group lacks"),
    (_many_areas(), "more than 16384 segment areas"),
]
PARSING = [
    ("a { " * 100 + "}" * 100, "nests too deeply"),
    ("x = 1 " * 100_000, "too long"),
    ("vg { id = ", "ends after '='"),
    ("vg { id = 1", "ends inside a section"),
    ("vg { } }", "stray"),
    (_vg(" ".join(f"l{n} {{ }}" for n in range(300))), "too many logical volumes"),
    (_vg("").replace('"ab-cd"', '"other"'), "not in its own volume group"),
]


@pytest.mark.parametrize(
    ("text", "message"), SEGMENTS + PARSING, ids=[m for _, m in SEGMENTS + PARSING]
)
def test_hostile_metadata_is_refused_with_one_line(text: str, message: str) -> None:
    with pytest.raises(LvmError, match=message) as info:
        lvm.volumes(text, "abcd", 64 * MiB)
    assert "\n" not in str(info.value)


def test_limits_are_as_the_hostile_cases_assume() -> None:
    assert (lvm.MAX_SEGMENTS, lvm.MAX_STRIPES, lvm.MAX_AREAS) == (1024, 128, 16384)


def test_two_names_of_one_physical_volume_do_not_let_volumes_share_it() -> None:
    alias = PV0.replace("pv0", "pv1")
    text = _vg(_lv("a", ONE) + _lv("b", _seg(1, 0, 2, ("pv1", 0))), pvs=alias)
    with pytest.raises(LvmError):
        lvm.volumes(text, "abcd", 64 * MiB)


def test_a_volume_of_two_segments_has_both() -> None:
    two = _lv("lv", _seg(2, 2, 1, ("pv0", 5)), _seg(1, 0, 2, ("pv0", 0)))  # in any order
    (found,) = lvm.volumes(_vg(two), "abcd", 64 * MiB)
    assert found.skipped is None and found.contiguous is None
    assert (found.name, found.size_bytes) == ("vg-lv", 12 * MiB)
    assert found.segments == (
        lvm.Segment(8 * MiB, 8 * MiB, (lvm.Area("abcd", MiB),)),
        lvm.Segment(4 * MiB, 4 * MiB, (lvm.Area("abcd", 21 * MiB),)),
    )


def test_a_striped_volume_has_its_stripes_and_areas() -> None:
    text = _vg(_lv("lv", _seg(1, 0, 4, ("pv0", 3), ("pv1", 0), stripe_size=16)), pvs=PV1)
    (found,) = lvm.volumes(text, "abcd", 64 * MiB)
    (seg,) = found.segments
    assert (found.size_bytes, seg.size_bytes, seg.stripe_bytes) == (16 * MiB, 16 * MiB, 8192)
    assert seg.areas == (lvm.Area("abcd", 13 * MiB), lvm.Area("efgh", MiB))
    assert lvm.area_bytes(seg) == 8 * MiB and found.pv_ids == {"abcd", "efgh"}


def test_a_thin_volume_is_listed_but_skipped() -> None:
    thin = (
        'lv { status = ["VISIBLE"] segment1 { start_extent = 0 extent_count = 1 type = "thin" } }'
    )
    (found,) = lvm.volumes(_vg(thin), "abcd", 64 * MiB)
    assert found.skipped is not None and "a thin volume" in found.skipped
    assert (found.segments, found.size_bytes, found.contiguous) == ((), 4 * MiB, None)


def test_a_volume_without_segments_is_skipped() -> None:
    (found,) = lvm.volumes(_vg(_lv("lv")), "abcd", 64 * MiB)
    assert found.skipped == "has no segments" and found.size_bytes == 0


def test_hidden_volumes_are_not_listed() -> None:
    text = _vg(_lv("a", ONE) + _lv("b", _seg(1, 0, 1, ("pv0", 2)), visible=False))
    assert [v.name for v in lvm.volumes(text, "abcd", 64 * MiB)] == ["vg-a"]


def test_a_volume_on_another_physical_volume_is_placed_there() -> None:
    text = _vg(_lv("lv", _seg(1, 0, 2, ("pv1", 2))), pvs=PV1)
    (found,) = lvm.volumes(text, "abcd", 64 * MiB)
    assert found.skipped is None and found.contiguous == lvm.Area("efgh", 9 * MiB)
    # this PV's size bounds only this PV's areas; pv1's pe_count (4 extents) bounds pv1's
    (again,) = lvm.volumes(text, "abcd", MiB)
    assert again == found


def test_lvm_crc_is_lvms() -> None:
    # LVM's calc_crc of "123456789" from its initial value (computed by lvm2's algorithm).
    crc = 0xF597A6CF
    for byte in b"123456789":
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    assert lvm.lvm_crc(b"123456789") == crc
