"""The store's metadata (format version 1): parsing, validation and paths. No I/O.

See docs/store-format.md. Everything read from a store is untrusted: names are
checked so that they can never address anything outside their own directory, and every
value is checked against what its later users take (a size is an off_t, a time fits
time_t and `time.gmtime`, a name is UTF-8), so that a hostile catalogue is refused here,
with one line, and never breaks the daemon or `backupfs ls` later.
"""

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from backupfs.errors import ManifestError

FORMAT = "backupfs-store"
VERSION = 1
CATALOGUE_NAME = "backupfs-store.json"
META_DIR = ".backupfs"
SNAPSHOT_META_NAME = "snapshot.json"
DIGEST_SIZE = 32
MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 64 << 20
# A catalogue entry takes about 250 bytes a disk: this is some 250,000 disks.
MAX_CATALOGUE_BYTES = 64 << 20
_INT64_MAX = (1 << 63) - 1  # sizes are an off_t (st_size), times st_mtime_ns
_MIN_TIME_NS = -(1 << 63)  # times before 1970 are negative, like st_mtime_ns
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class DiskEntry:
    name: str
    size_bytes: int
    mtime_ns: int
    block_size: int
    digests_sha256: str  # SHA-256 of the disk's digest file


@dataclass(frozen=True)
class SnapshotEntry:
    host: str
    name: str
    time_ns: int
    disks: tuple[DiskEntry, ...]


@dataclass(frozen=True)
class Catalogue:
    snapshots: tuple[SnapshotEntry, ...]


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


def parse_disk(raw: object) -> DiskEntry:
    if not isinstance(raw, dict):
        raise ManifestError("malformed store metadata: a disk entry is not an object")
    name = check_name(raw.get("name"), "disk")
    block_size = _int(raw.get("block_size"), f"block_size of {name}", MIN_BLOCK_SIZE, 1 << 62)
    if block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ManifestError(f"malformed store metadata: block_size of {name} is not a power of two")
    digest = raw.get("digests_sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise ManifestError(f"malformed store metadata: digests_sha256 of {name} is not SHA-256")
    return DiskEntry(
        name=name,
        size_bytes=_int(raw.get("size_bytes"), f"size_bytes of {name}"),
        mtime_ns=_int(raw.get("mtime_ns"), f"mtime_ns of {name}", lo=_MIN_TIME_NS),
        block_size=block_size,
        digests_sha256=digest,
    )


def parse_snapshot(raw: object) -> SnapshotEntry:
    if not isinstance(raw, dict):
        raise ManifestError("malformed store metadata: a snapshot entry is not an object")
    host = check_name(raw.get("host"), "host")
    name = check_name(raw.get("name"), "snapshot")
    disks_raw = raw.get("disks")
    if not isinstance(disks_raw, list):
        raise ManifestError(f"malformed store metadata: disks of {host}/{name} is not a list")
    disks = tuple(parse_disk(d) for d in disks_raw)
    _no_duplicates([d.name for d in disks], f"disk in {host}/{name}")
    return SnapshotEntry(host, name, _int(raw.get("time_ns"), "time_ns", lo=_MIN_TIME_NS), disks)


def _check_header(raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ManifestError("malformed store metadata: not a backupfs store catalogue")
    version = raw.get("version")
    if type(version) is not int or version != VERSION:
        raise ManifestError(
            f"store format version {version!r} is not supported (this backupfs reads {VERSION})"
        )
    return raw


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
    raw = _check_header(_load_json(data))
    snaps_raw = raw.get("snapshots")
    if not isinstance(snaps_raw, list):
        raise ManifestError("malformed store metadata: snapshots is not a list")
    snapshots = tuple(parse_snapshot(s) for s in snaps_raw)
    _no_duplicates([f"{s.host}/{s.name}" for s in snapshots], "snapshot")
    return Catalogue(snapshots)


def parse_snapshot_meta(data: bytes) -> SnapshotEntry:
    raw = _check_header(_load_json(data))
    return parse_snapshot(raw.get("snapshot"))


def _header() -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION}


def dump_catalogue(catalogue: Catalogue) -> bytes:
    doc = _header() | {"snapshots": [asdict(s) for s in catalogue.snapshots]}
    return json.dumps(doc, indent=1).encode() + b"\n"


def dump_snapshot_meta(snapshot: SnapshotEntry) -> bytes:
    doc = _header() | {"snapshot": asdict(snapshot)}
    return json.dumps(doc, indent=1).encode() + b"\n"
