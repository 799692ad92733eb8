"""The VMDK text descriptor: a descriptor file (monolithicFlat, twoGbMaxExtent*, ...) or
the descriptor embedded in a hosted sparse extent (VMware's "Virtual Disk Format 1.1").

Holds the parser of its lines (`key=value`, extent lines `ACCESS SECTORS TYPE "FILE"
[OFFSET]`, comments) and of the parent it names. Refused with FormatError: a descriptor
larger than MAX_DESCRIPTOR, text that does not decode, a line that is neither, an extent
line that does not parse or whose type backupfs does not read (VMFSSPARSE, SESPARSE,
VMFSRDM, VMFSRAW, NOACCESS extents), an extent file name that is not one path component,
a disk larger than MAX_VIRTUAL_SIZE, and a delta (parentCID set) that names no parent.
"""

import codecs
import re
from dataclasses import dataclass, field

from backupfs.errors import FormatError
from backupfs.store.formats.base import ParentRef

MAGIC_LINE = b"# Disk DescriptorFile"
MAX_DESCRIPTOR = 64 << 10  # a descriptor (file or embedded) is a few hundred bytes
MAX_VIRTUAL_SIZE = 1 << 46  # 64 TiB: more than any VMDK disk can be
SECTOR = 512
NO_PARENT_CID = "ffffffff"

_EXTENT_LINE = re.compile(
    r"(?P<access>RW|RDONLY|NOACCESS)\s+(?P<sectors>\d{1,20})\s+(?P<type>[A-Za-z]+)"
    r'(?:\s+"(?P<file>[^"]*)"(?:\s+(?P<offset>\d{1,20}))?)?'
)
_KEY_VALUE = re.compile(r"(?P<key>[A-Za-z][\w.:-]*)\s*=\s*(?P<value>.*)")
_ENCODING = re.compile(rb'encoding\s*=\s*"([\w.-]{1,40})"')
_CID = re.compile(r"[0-9a-fA-F]{1,8}")
_FLAT_TYPES = ("FLAT", "VMFS")


@dataclass(frozen=True)
class ExtentLine:
    """One extent of the disk: `sectors` of a FLAT file from sector `offset`, of a hosted
    SPARSE file, or of zeros (ZERO: no file)."""

    sectors: int
    kind: str  # "FLAT", "SPARSE" or "ZERO"
    file: str | None
    offset: int = 0


@dataclass
class Descriptor:
    fields: dict[str, str] = field(default_factory=dict)
    extents: list[ExtentLine] = field(default_factory=list)

    @property
    def sectors(self) -> int:
        return sum(e.sectors for e in self.extents)


def is_descriptor(head: bytes, file_size: int) -> bool:
    """A small text file (UTF-8, or the encoding it declares) that starts as a descriptor
    file must."""
    if not head.startswith(MAGIC_LINE) or file_size > MAX_DESCRIPTOR:
        return False
    try:
        _decode("", head.rstrip(b"\0"))
    except FormatError:
        return False
    return True


def parse_descriptor(name: str, data: bytes, *, embedded: bool) -> Descriptor:
    """The fields and extents of descriptor text `data` (NUL padding ends it). An embedded
    descriptor's extent lines (they name the sparse file itself) are not checked."""
    if len(data) > MAX_DESCRIPTOR:
        raise FormatError(f"{name}: vmdk descriptor larger than {MAX_DESCRIPTOR >> 10} KiB")
    desc = Descriptor()
    for number, line in enumerate(_decode(name, data.split(b"\0", 1)[0]).splitlines(), 1):
        _parse_line(name, number, line.strip(), desc, embedded)
    if not embedded:
        if not desc.extents:
            raise FormatError(f"{name}: vmdk descriptor names no extents")
        if desc.sectors * SECTOR > MAX_VIRTUAL_SIZE:
            raise FormatError(
                f"{name}: vmdk descriptor's extents make {desc.sectors} sectors, "
                f"more than {MAX_VIRTUAL_SIZE >> 40} TiB"
            )
    return desc


def parent_of(name: str, desc: Descriptor) -> ParentRef | None:
    """The parent a descriptor names (`parentFileNameHint`, `parentCID`), if any."""
    cid = desc.fields.get("parentCID", NO_PARENT_CID).lower()
    if not _CID.fullmatch(cid):
        raise FormatError(f"{name}: vmdk parentCID {cid[:20]!r} is not a 32-bit hex number")
    hint = desc.fields.get("parentFileNameHint")
    if hint is None:
        if cid != NO_PARENT_CID:
            raise FormatError(f"{name}: vmdk delta disk (parentCID {cid}) names no parent file")
        return None
    if not hint:
        raise FormatError(f"{name}: vmdk parentFileNameHint is empty")
    return ParentRef(path=hint, uuid=None if cid == NO_PARENT_CID else cid)


def _decode(name: str, text: bytes) -> str:
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        pass
    declared = _ENCODING.search(text)
    if declared is not None:
        try:
            return text.decode(codecs.lookup(declared.group(1).decode()).name)
        except (LookupError, UnicodeDecodeError):
            pass
    raise FormatError(f"{name}: vmdk descriptor is not text in its declared encoding")


def _parse_line(name: str, number: int, line: str, desc: Descriptor, embedded: bool) -> None:
    if not line or line.startswith("#"):
        return
    if line.split(None, 1)[0] in ("RW", "RDONLY", "NOACCESS"):
        if not embedded:
            desc.extents.append(_parse_extent(name, number, line))
        return
    pair = _KEY_VALUE.fullmatch(line)
    if pair is None:
        raise FormatError(f"{name}: vmdk descriptor line {number} is not understood")
    value = pair["value"].strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    elif value.startswith('"'):
        raise FormatError(f"{name}: vmdk descriptor line {number} has an unterminated quote")
    desc.fields[pair["key"]] = value


def _parse_extent(name: str, number: int, line: str) -> ExtentLine:
    where = f"{name}: vmdk descriptor line {number}"
    match = _EXTENT_LINE.fullmatch(line)
    if match is None:
        raise FormatError(f"{where} is not an extent line")
    kind, file, offset = match["type"].upper(), match["file"], match["offset"]
    sectors = int(match["sectors"])
    if match["access"] == "NOACCESS":
        raise FormatError(f"{where}: NOACCESS extents are not supported")
    if not 0 < sectors <= MAX_VIRTUAL_SIZE // SECTOR:
        raise FormatError(f"{where}: extent of {sectors} sectors")
    if kind == "ZERO":
        if file is not None:
            raise FormatError(f"{where}: a ZERO extent names a file")
        return ExtentLine(sectors, "ZERO", None)
    if kind not in _FLAT_TYPES and kind != "SPARSE":
        raise FormatError(f"{where}: {kind} extents are not supported")
    if file is None:
        raise FormatError(f"{where}: the extent names no file")
    _check_file_name(where, file)
    if kind == "SPARSE":
        if offset is not None:
            raise FormatError(f"{where}: a SPARSE extent has an offset")
        return ExtentLine(sectors, "SPARSE", file)
    if offset is None and kind == "FLAT":
        raise FormatError(f"{where}: a FLAT extent has no offset")
    start = int(offset or 0)
    if start > MAX_VIRTUAL_SIZE // SECTOR:
        raise FormatError(f"{where}: extent offset {start} is past any file")
    return ExtentLine(sectors, "FLAT", file, start)


def _check_file_name(where: str, file: str) -> None:
    """Extent files are looked for beside the descriptor: one path component only."""
    if file in ("", ".", "..") or any(c in file for c in "/\\\0"):
        raise FormatError(f"{where}: extent file {file!r} is not in the descriptor's directory")
