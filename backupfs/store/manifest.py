"""The store's metadata (format versions 1 and 2): parsing, validation and paths. No I/O.

See docs/store-format.md. Everything read from a store is untrusted: names are
checked so that they can never address anything outside their own directory, and every
value is checked against what its later users take (a size is an off_t, a time fits
time_t and `time.gmtime`, a name is UTF-8), so that a hostile catalogue is refused here,
with one line, and never breaks the daemon or `backupfs ls` later.
"""

import dataclasses
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from backupfs.errors import ManifestError
from backupfs.store.digestfile import INDEX_SUFFIX

FORMAT = "backupfs-store"
VERSION = 2  # what `backupfs index` writes
READABLE_VERSIONS = (1, 2)  # 1: each digest file is verified whole (digestfile.py for 2)
CATALOGUE_NAME = "backupfs-store.json"
META_DIR = ".backupfs"
SNAPSHOT_META_NAME = "snapshot.json"
MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 64 << 20
# A catalogue entry takes about 250 bytes a disk: this is some 250,000 disks.
MAX_CATALOGUE_BYTES = 64 << 20
_INT64_MAX = (1 << 63) - 1  # sizes are an off_t (st_size), times st_mtime_ns
_MIN_TIME_NS = -(1 << 63)  # times before 1970 are negative, like st_mtime_ns
_HEX64 = re.compile(r"[0-9a-f]{64}")
DISK_FORMATS = ("raw", "qcow2", "vmdk", "vhd", "vhdx")
MAX_EXTENT_FILES = 1024  # a twoGbMaxExtent VMDK of 2 TiB has 1024


@dataclass(frozen=True)
class DiskEntry:
    name: str
    size_bytes: int
    mtime_ns: int
    block_size: int
    digests_sha256: str | None = None  # version 1: SHA-256 of the whole digest file
    digest_index_sha256: str | None = None  # version 2: SHA-256 of its chunk index
    format: str = "raw"  # what the file holds: DISK_FORMATS
    virtual_size: int | None = None  # the guest's disk, when the format is not raw
    parent: str | None = None  # "host/snapshot/file" of the image below it in its chain
    extents: tuple["DiskEntry", ...] = ()  # a VMDK descriptor's extent files, in order

    @property
    def served_name(self) -> str:
        return served_name(self.name, self.format)

    @property
    def served_size(self) -> int:
        return self.size_bytes if self.virtual_size is None else self.virtual_size


@dataclass(frozen=True)
class SnapshotEntry:
    host: str
    name: str
    time_ns: int
    disks: tuple[DiskEntry, ...]


@dataclass(frozen=True)
class Catalogue:
    snapshots: tuple[SnapshotEntry, ...]


def served_name(name: str, fmt: str) -> str:
    """The name the mount shows a stored file by: the guest's disk as a raw `.img`,
    whatever the format (a raw image keeps its own name)."""
    if fmt == "raw":
        return name
    return (name.rsplit(".", 1)[0] if "." in name else name) + ".img"


def check_name(name: object, what: str) -> str:
    """A single path component that is safe to use as a file name and in a URL. Control
    characters are allowed (file names may hold them): printing escapes them."""
    if not isinstance(name, str) or not name:
        raise ManifestError(f"malformed store metadata: {what} name must be a non-empty string")
    try:
        encoded = name.encode()
    except UnicodeEncodeError:  # a lone surrogate: "\ud800" is valid JSON
        raise ManifestError(f"unsafe {what} name in store metadata: {name!r} (not UTF-8)") from None
    if name in (".", "..") or "/" in name or "\0" in name or len(encoded) > 255:
        raise ManifestError(f"unsafe {what} name in store metadata: {name!r}")
    if name.startswith("."):
        raise ManifestError(f"unsafe {what} name in store metadata: {name!r} (hidden name)")
    return name


def snapshot_meta_path(host: str, snapshot: str) -> str:
    return f"{host}/{snapshot}/{META_DIR}/{SNAPSHOT_META_NAME}"


def digests_path(host: str, snapshot: str, disk: str) -> str:
    return f"{host}/{snapshot}/{META_DIR}/{disk}.sha256"


def image_path(host: str, snapshot: str, disk: str) -> str:
    return f"{host}/{snapshot}/{disk}"


def _int(value: object, what: str, lo: int = 0, hi: int = _INT64_MAX) -> int:
    bound = f" >= {lo}" if lo > _MIN_TIME_NS else ""
    if not isinstance(value, int) or isinstance(value, bool) or (bound and value < lo):
        raise ManifestError(f"malformed store metadata: {what} must be an integer{bound}")
    if not lo <= value <= hi:
        raise ManifestError(f"malformed store metadata: {what} is out of range ({lo} to {hi})")
    return value


def digest_index_path(host: str, snapshot: str, disk: str) -> str:
    return digests_path(host, snapshot, disk) + INDEX_SUFFIX


def _sha256_hex(raw: dict[str, Any], key: str, name: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ManifestError(f"malformed store metadata: {key} of {name} is not SHA-256")
    return value


def parse_disk(raw: object, version: int = VERSION) -> DiskEntry:
    if not isinstance(raw, dict):
        raise ManifestError("malformed store metadata: a disk entry is not an object")
    name = check_name(raw.get("name"), "disk")
    block_size = _int(raw.get("block_size"), f"block_size of {name}", MIN_BLOCK_SIZE, 1 << 62)
    if block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ManifestError(f"malformed store metadata: block_size of {name} is not a power of two")
    digest_key = "digests_sha256" if version == 1 else "digest_index_sha256"
    entry = DiskEntry(
        name=name,
        size_bytes=_int(raw.get("size_bytes"), f"size_bytes of {name}"),
        mtime_ns=_int(raw.get("mtime_ns"), f"mtime_ns of {name}", lo=_MIN_TIME_NS),
        block_size=block_size,
    )
    digest = _sha256_hex(raw, digest_key, name)
    if version == 1:
        entry = dataclasses.replace(entry, digests_sha256=digest)
    else:
        entry = dataclasses.replace(entry, digest_index_sha256=digest)
    if version == 1 or raw.get("format", "raw") == "raw":
        if any(key in raw for key in ("virtual_size", "parent", "extents")):
            raise ManifestError(f"malformed store metadata: {name} is raw but has a chain")
        return entry
    return _with_format(entry, raw, version)


def _parent_path(value: object, name: str) -> str:
    if not isinstance(value, str) or value.count("/") != 2:
        raise ManifestError(f"malformed store metadata: parent of {name} is not host/snapshot/file")
    host, snap, disk = value.split("/")
    check_name(host, "host"), check_name(snap, "snapshot"), check_name(disk, "disk")
    return value


def _with_format(entry: DiskEntry, raw: dict[str, Any], version: int) -> DiskEntry:
    """The format, virtual size, parent and extent files of a disk that is not raw."""
    name, fmt = entry.name, raw.get("format")
    if fmt not in DISK_FORMATS:
        raise ManifestError(f"malformed store metadata: format of {name} is not one of "
                            f"{', '.join(DISK_FORMATS)}")  # fmt: skip
    extents_raw = raw.get("extents", [])
    if not isinstance(extents_raw, list) or len(extents_raw) > MAX_EXTENT_FILES:
        raise ManifestError(f"malformed store metadata: extents of {name} is not a short list")
    extents = tuple(parse_disk(e, version) for e in extents_raw)
    if any(e.format != "raw" for e in extents):
        raise ManifestError(f"malformed store metadata: an extent file of {name} is not raw")
    parent = raw.get("parent")
    return dataclasses.replace(
        entry,
        format=str(fmt),
        virtual_size=_int(raw.get("virtual_size"), f"virtual_size of {name}"),
        parent=None if parent is None else _parent_path(parent, name),
        extents=extents,
    )


def parse_snapshot(raw: object, version: int = VERSION) -> SnapshotEntry:
    if not isinstance(raw, dict):
        raise ManifestError("malformed store metadata: a snapshot entry is not an object")
    host = check_name(raw.get("host"), "host")
    name = check_name(raw.get("name"), "snapshot")
    disks_raw = raw.get("disks")
    if not isinstance(disks_raw, list):
        raise ManifestError(f"malformed store metadata: disks of {host}/{name} is not a list")
    disks = tuple(parse_disk(d, version) for d in disks_raw)
    _no_duplicates([d.name for d in disks], f"disk in {host}/{name}")
    _no_duplicates([d.served_name for d in disks], f"served disk in {host}/{name}")
    return SnapshotEntry(host, name, _int(raw.get("time_ns"), "time_ns", lo=_MIN_TIME_NS), disks)


def _check_header(raw: object) -> tuple[dict[str, Any], int]:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ManifestError("malformed store metadata: not a backupfs store catalogue")
    version = raw.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise ManifestError(
            f"store format version {version!r} is not supported (this backupfs reads {readable})"
        )
    return raw, version


def _no_duplicates(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise ManifestError(f"malformed store metadata: duplicate {what} name")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _load_json(data: bytes) -> object:
    if len(data) > MAX_CATALOGUE_BYTES:
        raise ManifestError(
            f"malformed store metadata: larger than {MAX_CATALOGUE_BYTES >> 20} MiB"
        )
    try:
        return json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ManifestError(
            "malformed store metadata: not valid JSON (nested too deeply)"
        ) from None
    except ValueError as exc:  # UnicodeDecodeError too, and integers over 4300 digits
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ManifestError(f"malformed store metadata: not valid JSON ({reason})") from None


def parse_catalogue(data: bytes) -> Catalogue:
    raw, version = _check_header(_load_json(data))
    snaps_raw = raw.get("snapshots")
    if not isinstance(snaps_raw, list):
        raise ManifestError("malformed store metadata: snapshots is not a list")
    snapshots = tuple(parse_snapshot(s, version) for s in snaps_raw)
    _no_duplicates([f"{s.host}/{s.name}" for s in snapshots], "snapshot")
    return Catalogue(snapshots)


def parse_snapshot_meta(data: bytes) -> SnapshotEntry:
    raw, version = _check_header(_load_json(data))
    return parse_snapshot(raw.get("snapshot"), version)


def _header() -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION}


def _disk_doc(disk: dict[str, Any]) -> dict[str, Any]:
    """A disk entry as JSON, without the keys at their defaults (the other version's digest
    key, the chain of a raw disk)."""
    defaults: dict[str, Any] = {"format": "raw", "extents": ()}
    doc = {k: v for k, v in disk.items() if v is not None and defaults.get(k, ...) != v}
    if "extents" in doc:
        doc["extents"] = [_disk_doc(e) for e in doc["extents"]]
    return doc


def _snapshot_doc(snapshot: SnapshotEntry) -> dict[str, Any]:
    doc = asdict(snapshot)
    doc["disks"] = [_disk_doc(d) for d in doc["disks"]]
    return doc


def dump_catalogue(catalogue: Catalogue) -> bytes:
    doc = _header() | {"snapshots": [_snapshot_doc(s) for s in catalogue.snapshots]}
    return json.dumps(doc, indent=1).encode() + b"\n"


def dump_snapshot_meta(snapshot: SnapshotEntry) -> bytes:
    doc = _header() | {"snapshot": _snapshot_doc(snapshot)}
    return json.dumps(doc, indent=1).encode() + b"\n"
