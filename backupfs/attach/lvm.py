"""LVM2 read in userspace: the physical volume's label, its metadata area and the volume
group text in it, and where each logical volume lies on the disk. Nothing of the host's
LVM is used or touched (no vgchange, no device-mapper), so any number of volume groups of
one name, from different snapshots, attach side by side.

Everything here is hostile input: the label, the metadata area header and the text are
checked with their checksums, sizes are bounded (MAX_TEXT_BYTES, MAX_TOKENS, MAX_DEPTH,
MAX_VOLUMES, MAX_SEGMENTS, MAX_STRIPES, MAX_AREAS), every area is checked against its
physical volume, and no extent may belong to two volumes. Linear and striped segments are
read (`LogicalVolume.segments`: where each lies, by physical volume id); a volume of any
other kind (thin, RAID, cache, snapshot) is listed with the reason it is not mounted.
"""

import itertools
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backupfs.errors import UserError

SECTOR = 512
LABEL_ID = b"LABELONE"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
INITIAL_CRC = 0xF597A6CF
MAX_TEXT_BYTES = 4 << 20
MAX_TOKENS = 200_000
MAX_DEPTH = 16
MAX_VOLUMES = 256
MAX_LOCNS = 16
MAX_SEGMENTS = 1024  # of one volume
MAX_STRIPES = 128
MAX_AREAS = 16384  # of all volumes of a group
_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|(-?\d+)|([A-Za-z0-9_.+-]+)|([={}\[\],]))')


class LvmError(UserError):
    """LVM metadata that is malformed or hostile."""


@dataclass(frozen=True)
class Area:
    """Where one stripe of a segment lies: on which physical volume, how far into it."""

    pv_id: str  # as the label has it: 32 characters, no dashes
    start_bytes: int  # from the start of the physical volume


@dataclass(frozen=True)
class Segment:
    """A run of a volume: one area (linear), or stripes of `stripe_bytes` taken in turn
    from each of its areas, each area holding size_bytes / len(areas)."""

    size_bytes: int
    stripe_bytes: int
    areas: tuple[Area, ...]


@dataclass(frozen=True)
class LogicalVolume:
    name: str  # as shown: VG-LV
    size_bytes: int
    segments: tuple[Segment, ...]
    skipped: str | None  # why it is not mounted, or None

    @property
    def contiguous(self) -> Area | None:
        """The one area of a one-segment linear volume: a loop device's range of a disk."""
        if len(self.segments) == 1 and len(self.segments[0].areas) == 1:
            return self.segments[0].areas[0]
        return None

    @property
    def pv_ids(self) -> set[str]:
        return {a.pv_id for s in self.segments for a in s.areas}


def lvm_crc(data: bytes) -> int:
    """LVM's CRC-32: zlib's polynomial, started from INITIAL_CRC, without the final xor."""
    return ~zlib.crc32(data, ~INITIAL_CRC & 0xFFFFFFFF) & 0xFFFFFFFF


def _u(fmt: str, data: bytes, at: int) -> tuple[int, ...]:
    try:
        return struct.unpack_from(fmt, data, at)
    except struct.error:
        raise LvmError("LVM label is cut short") from None


def read_metadata(read: Callable[[int, int], bytes], pv_size: int) -> tuple[str, str]:
    """The physical volume's id and its newest committed volume group text."""
    for sector in range(4):
        label = read(sector * SECTOR, SECTOR)
        if label[:8] == LABEL_ID:
            break
    else:
        raise LvmError("no LVM label in the first 4 sectors")
    (crc,) = _u("<I", label, 16)
    if lvm_crc(label[20:SECTOR]) != crc:
        raise LvmError("LVM label checksum does not match")
    (offset,) = _u("<I", label, 20)
    if not 32 <= offset <= SECTOR - 40:
        raise LvmError("LVM label points outside itself")
    pv_id = label[offset : offset + 32].decode("ascii", "replace")
    pos, areas = offset + 40, []  # skip the uuid and the device size
    for _ in range(2):  # data areas, then metadata areas, each list ending with (0, 0)
        found = []
        for _ in range(MAX_LOCNS):
            start, size = _u("<QQ", label, pos)
            pos += 16
            if start == 0 and size == 0:
                break
            found.append((start, size))
        areas.append(found)
    if not areas[1]:
        raise LvmError("this physical volume has no metadata area")
    mda_start, mda_size = areas[1][0]
    if mda_start + mda_size > pv_size or mda_size < 2 * SECTOR:
        raise LvmError("LVM metadata area lies outside the volume")
    return pv_id, _newest_text(read, mda_start, mda_size)


def _newest_text(read: Callable[[int, int], bytes], mda_start: int, mda_size: int) -> str:
    header = read(mda_start, SECTOR)
    (crc,) = _u("<I", header, 0)
    if header[4:20] != MDA_MAGIC or lvm_crc(header[4:SECTOR]) != crc:
        raise LvmError("LVM metadata area header is damaged")
    offset, size, text_crc, _flags = _u("<QQII", header, 40)
    if size == 0 or size > min(MAX_TEXT_BYTES, mda_size - SECTOR) or offset >= mda_size:
        raise LvmError(f"LVM metadata of {size} bytes at {offset} does not fit its area")
    first = min(size, mda_size - offset)  # the area is a ring after its header
    text = read(mda_start + offset, first)
    if first < size:
        text += read(mda_start + SECTOR, size - first)
    if lvm_crc(text) != text_crc:
        raise LvmError("LVM metadata checksum does not match")
    return text.rstrip(b"\0").decode("utf-8", "replace")


def parse_text(text: str) -> dict[str, Any]:
    """LVM's text format: `key = value`, `name { ... }`, strings, integers, lists."""
    tokens = _tokens(text)
    doc, pos = _section(tokens, 0, 0)
    if pos != len(tokens):
        raise LvmError("LVM metadata has a stray '}'")
    return doc


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise LvmError(f"LVM metadata has text it cannot read at {pos}")
            break
        pos = m.end()
        if m.group(1) is None:
            out.append(m.group(0).strip())
        if len(out) > MAX_TOKENS:
            raise LvmError("LVM metadata is too long")
    return out


def _section(tokens: list[str], pos: int, depth: int) -> tuple[dict[str, Any], int]:
    if depth > MAX_DEPTH:
        raise LvmError("LVM metadata nests too deeply")
    doc: dict[str, Any] = {}
    while pos < len(tokens) and tokens[pos] != "}":
        key = tokens[pos]
        nxt = tokens[pos + 1] if pos + 1 < len(tokens) else ""
        if nxt == "{":
            doc[key], pos = _section(tokens, pos + 2, depth + 1)
            if pos >= len(tokens):
                raise LvmError("LVM metadata ends inside a section")
            pos += 1
        elif nxt == "=":
            doc[key], pos = _value(tokens, pos + 2)
        else:
            raise LvmError(f"LVM metadata: unexpected {nxt!r} after {key!r}")
    return doc, pos


def _value(tokens: list[str], pos: int) -> tuple[Any, int]:
    if pos >= len(tokens):
        raise LvmError("LVM metadata ends after '='")
    if tokens[pos] == "[":
        items: list[Any] = []
        pos += 1
        while pos < len(tokens) and tokens[pos] != "]":
            if tokens[pos] != ",":
                item, pos = _value(tokens, pos)
                items.append(item)
            else:
                pos += 1
        return items, pos + 1
    return _scalar(tokens[pos]), pos + 1


def _scalar(token: str) -> Any:
    if token.startswith('"'):
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    raise LvmError(f"LVM metadata: {token!r} is not a value")


def volumes(text: str, pv_id: str, pv_size: int) -> list[LogicalVolume]:
    """Each visible logical volume of the volume group whose metadata `text` the physical
    volume `pv_id` (of `pv_size` bytes) holds: its segments, or why it is not mounted.
    Every area is checked against its physical volume's extents (and this one's size);
    two volumes sharing an extent, or a volume whose segments leave gaps, is refused."""
    doc = parse_text(text)
    groups = [(k, v) for k, v in doc.items() if isinstance(v, dict)]
    if len(groups) != 1:
        raise LvmError("LVM metadata does not hold one volume group")
    vg_name, vg = groups[0]
    extent = _int(vg, "extent_size") * SECTOR
    pvs = _physical_volumes(vg, extent)
    if pv_id not in {v[0] for v in pvs.values()}:
        raise LvmError("this physical volume is not in its own volume group's metadata")
    lvs = vg.get("logical_volumes", {})
    if not isinstance(lvs, dict) or len(lvs) > MAX_VOLUMES:
        raise LvmError("LVM metadata lists too many logical volumes")
    out, used = [], _Extents()
    for lv_name, lv in lvs.items():
        if not isinstance(lv, dict):
            continue
        name = f"{vg_name}-{lv_name}"
        found = _laid_out(name, lv, pvs, extent, used)
        if "VISIBLE" in lv.get("status", []):
            out.append(found)
    used.check()
    for found in out:
        for seg in found.segments:
            for area in seg.areas:
                if area.pv_id == pv_id and area.start_bytes + area_bytes(seg) > pv_size:
                    name = found.name
                    raise LvmError(f"LVM volume {name} lies past the end of its physical volume")
    return out


def area_bytes(seg: Segment) -> int:
    """How much of its physical volume each area of `seg` takes."""
    return seg.size_bytes // len(seg.areas)


def _int(section: dict[str, Any], key: str, low: int = 1) -> int:
    value = section.get(key)
    if not isinstance(value, int) or value < low or value > 1 << 62:
        adjective = "positive" if low > 0 else "non-negative"
        raise LvmError(f"LVM metadata: {key} is not a {adjective} integer")
    return value


def _physical_volumes(vg: dict[str, Any], extent: int) -> dict[str, tuple[str, int, int]]:
    """name -> (id, pe_start in bytes, bytes of extents it has)."""
    pvs = vg.get("physical_volumes", {})
    out: dict[str, tuple[str, int, int]] = {}
    for name, pv in pvs.items() if isinstance(pvs, dict) else []:
        if isinstance(pv, dict) and len(out) < MAX_VOLUMES:
            pe_count = pv.get("pe_count", 1 << 40)  # absent in old metadata: the size checks
            if not isinstance(pe_count, int) or not 0 <= pe_count <= 1 << 40:
                raise LvmError(f"LVM metadata: pe_count of {name} is not a count")
            pv_id = str(pv.get("id", "")).replace("-", "")
            if any(pv_id == other[0] for other in out.values()):
                raise LvmError(f"LVM metadata names physical volume {pv_id[:8]} twice")
            out[name] = (pv_id, _int(pv, "pe_start") * SECTOR, pe_count * extent)
    return out


class _Extents:
    """The extents every area takes, per physical volume id; `check` refuses two that
    overlap (sorted: n log n, whatever the metadata's order)."""

    def __init__(self) -> None:
        self.taken: dict[str, list[tuple[int, int, str]]] = {}
        self.count = 0

    def claim(self, pv_id: str, start: int, size: int, name: str) -> None:
        self.count += 1
        if self.count > MAX_AREAS:
            raise LvmError(f"LVM metadata has more than {MAX_AREAS} segment areas")
        self.taken.setdefault(pv_id, []).append((start, start + size, name))

    def check(self) -> None:
        for pv_id, areas in self.taken.items():
            areas.sort()
            for (_, end, first), (start, _, second) in itertools.pairwise(areas):
                if start < end:
                    raise LvmError(
                        f"LVM volumes {first} and {second} share extents of PV {pv_id[:8]}"
                    )


def _laid_out(
    name: str,
    lv: dict[str, Any],
    pvs: dict[str, tuple[str, int, int]],
    extent: int,
    used: _Extents,
) -> LogicalVolume:
    raw = [v for k, v in lv.items() if k.startswith("segment") and isinstance(v, dict)]
    if len(raw) > MAX_SEGMENTS:
        raise LvmError(f"LVM volume {name} has more than {MAX_SEGMENTS} segments")
    raw.sort(key=lambda seg: _int(seg, "start_extent", 0))
    segments, next_extent, skipped = [], 0, None
    for seg in raw:
        kind, count = seg.get("type"), _int(seg, "extent_count")
        if _int(seg, "start_extent", 0) != next_extent:
            raise LvmError(f"LVM volume {name}: its segments overlap or leave a gap")
        next_extent += count
        if kind != "striped":
            skipped = skipped or kind_reason(kind)
            continue
        segments.append(_striped(name, seg, (count, extent), pvs, used))
    if not raw:
        skipped = "has no segments"
    size = next_extent * extent
    return LogicalVolume(name, size, tuple(segments), skipped)


_KINDS = {  # segment type -> what it is, for the reason a volume is not mounted
    "thin": "a thin volume",
    "thin-pool": "a thin pool",
    "snapshot": "a snapshot volume",
    "mirror": "a mirrored volume",
    "cache": "a cached volume",
    "writecache": "a cached volume",
    "cache-pool": "a cache pool",
    "vdo": "a VDO volume",
    "vdo-pool": "a VDO pool",
    "integrity": "an integrity volume",
}


def kind_reason(kind: object) -> str:
    """Why a volume of a segment type other than linear or striped is not mounted."""
    text = str(kind)[:40]
    if text.startswith("raid"):
        return f"a RAID volume ({text}: not supported)"
    return f"{_KINDS.get(text, f'a {text} volume')} (not supported)"


def _striped(
    name: str,
    seg: dict[str, Any],
    extents: tuple[int, int],
    pvs: dict[str, tuple[str, int, int]],
    used: _Extents,
) -> Segment:
    """A striped segment (linear: one stripe) of `extents` = (count, extent bytes)."""
    count, stripes = _int(seg, "stripe_count"), seg.get("stripes")
    if count > MAX_STRIPES or not isinstance(stripes, list) or len(stripes) != 2 * count:
        raise LvmError(f"LVM volume {name}: its stripes are not {count} (PV, extent) pairs")
    size = extents[0] * extents[1]
    area_size = size // count
    stripe = area_size if count == 1 else _int(seg, "stripe_size") * SECTOR
    if extents[0] % count or area_size % stripe:
        raise LvmError(f"LVM volume {name}: {extents[0]} extents do not split into {count} stripes")
    areas = []
    for pv_name, first in zip(stripes[::2], stripes[1::2], strict=True):
        if pv_name not in pvs or not isinstance(first, int) or first < 0:
            raise LvmError(f"LVM volume {name} names a physical volume the group lacks")
        pv_id, pe_start, pv_bytes = pvs[pv_name]
        begin = first * extents[1]
        if begin + area_size > pv_bytes:
            raise LvmError(f"LVM volume {name} lies past the end of its physical volume")
        used.claim(pv_id, begin, area_size, name)
        areas.append(Area(pv_id, pe_start + begin))
    return Segment(size, stripe, tuple(areas))
