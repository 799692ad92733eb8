"""LVM2 read in userspace: the physical volume's label, its metadata area and the volume
group text in it, and where each logical volume lies on the disk. Nothing of the host's
LVM is used or touched (no vgchange, no device-mapper), so any number of volume groups of
one name, from different snapshots, attach side by side.

Everything here is hostile input: the label, the metadata area header and the text are
checked with their checksums, sizes are bounded (MAX_TEXT_BYTES, MAX_TOKENS, MAX_DEPTH,
MAX_VOLUMES), and every extent is checked against the physical volume. A volume that is
not one contiguous linear range of this disk is listed with the reason it is not mounted.
"""

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
_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|(-?\d+)|([A-Za-z0-9_.+-]+)|([={}\[\],]))')


class LvmError(UserError):
    """LVM metadata that is malformed or hostile."""


@dataclass(frozen=True)
class LogicalVolume:
    name: str  # as shown: VG-LV
    start_bytes: int  # from the start of the physical volume
    size_bytes: int
    skipped: str | None  # why it is not mounted, or None


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
    """Each visible logical volume of the volume group, where it lies on this physical
    volume, or why it is not mounted."""
    doc = parse_text(text)
    groups = [(k, v) for k, v in doc.items() if isinstance(v, dict)]
    if len(groups) != 1:
        raise LvmError("LVM metadata does not hold one volume group")
    vg_name, vg = groups[0]
    extent = _int(vg, "extent_size") * SECTOR
    pv_name, pe_start = _this_pv(vg, pv_id)
    out = []
    lvs = vg.get("logical_volumes", {})
    if not isinstance(lvs, dict) or len(lvs) > MAX_VOLUMES:
        raise LvmError("LVM metadata lists too many logical volumes")
    for lv_name, lv in lvs.items():
        if not isinstance(lv, dict) or "VISIBLE" not in lv.get("status", []):
            continue
        name = f"{vg_name}-{lv_name}"
        out.append(_placed(name, lv, pv_name, pe_start * SECTOR, extent, pv_size))
    return out


def _int(section: dict[str, Any], key: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or value <= 0 or value > 1 << 62:
        raise LvmError(f"LVM metadata: {key} is not a positive integer")
    return value


def _this_pv(vg: dict[str, Any], pv_id: str) -> tuple[str, int]:
    pvs = vg.get("physical_volumes", {})
    for name, pv in pvs.items() if isinstance(pvs, dict) else []:
        if isinstance(pv, dict) and str(pv.get("id", "")).replace("-", "") == pv_id:
            return name, _int(pv, "pe_start")
    raise LvmError("this physical volume is not in its own volume group's metadata")


def _placed(
    name: str, lv: dict[str, Any], pv_name: str, pe_start: int, extent: int, pv_size: int
) -> LogicalVolume:
    segments = [v for k, v in sorted(lv.items()) if k.startswith("segment") and isinstance(v, dict)]
    if len(segments) != 1:
        return LogicalVolume(
            name, 0, 0, f"{len(segments)} segments (concatenation is not supported yet)"
        )
    seg = segments[0]
    kind, stripes = seg.get("type"), seg.get("stripes")
    if kind != "striped" or seg.get("stripe_count") != 1 or not isinstance(stripes, list):
        return LogicalVolume(name, 0, 0, f"a {kind} volume (not supported)")
    if len(stripes) != 2 or stripes[0] != pv_name or not isinstance(stripes[1], int):
        return LogicalVolume(name, 0, 0, "lies on another physical volume (not supported yet)")
    start = pe_start + stripes[1] * extent
    size = _int(seg, "extent_count") * extent
    if stripes[1] < 0 or start + size > pv_size:
        raise LvmError(f"LVM volume {name} lies past the end of its physical volume")
    return LogicalVolume(name, start, size, None)
