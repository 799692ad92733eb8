"""The store's metadata (format versions 1 to 3): parsing, validation and paths. No I/O.

See docs/store-format.md. Everything read from a store is untrusted: names are
checked so that they can never address anything outside their own directory, and every
value is checked against what its later users take (a size is an off_t, a time fits
time_t and `time.gmtime`, a name is UTF-8), so that a hostile catalogue is refused here,
with one line, and never breaks the daemon or `backupfs ls` later.
"""

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from backupfs.errors import ManifestError
from backupfs.store.digestfile import INDEX_SUFFIX
from backupfs.store.untrusted import MIN_TIME_NS, check_int, check_sha256_hex, no_duplicates
from backupfs.store.untrusted import load_json as _untrusted_json

FORMAT = "backupfs-store"
VERSION = 3  # what `backupfs index` writes: the catalogue split in one part per host
# The shape of a snapshot entry, of snapshot.json and of a whole catalogue (dump_catalogue).
ENTRY_VERSION = 2
READABLE_VERSIONS = (1, 2, 3)  # 1: each digest file is verified whole (digestfile.py for 2)
CATALOGUE_NAME = "backupfs-store.json"
META_DIR = ".backupfs"
HOSTS_DIR = f"{META_DIR}/hosts"  # version 3's host parts: no host name starts with "."
HOST_PART_SUFFIX = ".json"
SNAPSHOT_META_NAME = "snapshot.json"
MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 64 << 20
# A catalogue entry takes about 250 bytes a disk: this is some 250,000 disks.
MAX_CATALOGUE_BYTES = 64 << 20
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
    """A whole catalogue: every snapshot of the store (version 1 or 2, or version 3 once
    all its host parts are read)."""

    snapshots: tuple[SnapshotEntry, ...]


@dataclass(frozen=True)
class HostEntry:
    """A host in a version 3 catalogue: what its part must be, and what it holds."""

    name: str
    catalogue_sha256: str  # of the part's bytes
    catalogue_size: int  # the part's size in bytes
    snapshots: int  # how many snapshots the part lists
    time_ns: int  # its newest snapshot's time
    block_sizes: tuple[int, ...]  # the block sizes of its disks (a mount's block_size=)

    @property
    def path(self) -> str:
        return host_catalogue_path(self.name)


@dataclass(frozen=True)
class ProbeEntry:
    """A stored file of the store, for a mount's Range probe before any host part is read."""

    path: str  # "host/snapshot/file"
    size_bytes: int


@dataclass(frozen=True)
class HostIndex:
    """The top level of a version 3 catalogue. `refused`: hosts listed more than once,
    with the one line that says so (neither entry is trusted; the other hosts are)."""

    hosts: tuple[HostEntry, ...]
    refused: tuple[tuple[str, str], ...] = ()
    probe: ProbeEntry | None = None


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


def host_catalogue_path(host: str) -> str:
    """Where a version 3 store keeps the part of its catalogue that lists `host`."""
    return f"{HOSTS_DIR}/{host}{HOST_PART_SUFFIX}"


def snapshot_meta_path(host: str, snapshot: str) -> str:
    return f"{host}/{snapshot}/{META_DIR}/{SNAPSHOT_META_NAME}"


def digests_path(host: str, snapshot: str, disk: str) -> str:
    return f"{host}/{snapshot}/{META_DIR}/{disk}.sha256"


def image_path(host: str, snapshot: str, disk: str) -> str:
    return f"{host}/{snapshot}/{disk}"


def digest_index_path(host: str, snapshot: str, disk: str) -> str:
    return digests_path(host, snapshot, disk) + INDEX_SUFFIX


def parse_disk(raw: object, version: int = ENTRY_VERSION) -> DiskEntry:
    if not isinstance(raw, dict):
        raise ManifestError("malformed store metadata: a disk entry is not an object")
    name = check_name(raw.get("name"), "disk")
    block_size = check_int(raw.get("block_size"), f"block_size of {name}", MIN_BLOCK_SIZE, 1 << 62)
    if block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ManifestError(f"malformed store metadata: block_size of {name} is not a power of two")
    digest_key = "digests_sha256" if version == 1 else "digest_index_sha256"
    entry = DiskEntry(
        name=name,
        size_bytes=check_int(raw.get("size_bytes"), f"size_bytes of {name}"),
        mtime_ns=check_int(raw.get("mtime_ns"), f"mtime_ns of {name}", lo=MIN_TIME_NS),
        block_size=block_size,
    )
    digest = check_sha256_hex(raw, digest_key, name)
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
        virtual_size=check_int(raw.get("virtual_size"), f"virtual_size of {name}"),
        parent=None if parent is None else _parent_path(parent, name),
        extents=extents,
    )


def parse_snapshot(raw: object, version: int = ENTRY_VERSION) -> SnapshotEntry:
    if not isinstance(raw, dict):
        raise ManifestError("malformed store metadata: a snapshot entry is not an object")
    host = check_name(raw.get("host"), "host")
    name = check_name(raw.get("name"), "snapshot")
    disks_raw = raw.get("disks")
    if not isinstance(disks_raw, list):
        raise ManifestError(f"malformed store metadata: disks of {host}/{name} is not a list")
    disks = tuple(parse_disk(d, version) for d in disks_raw)
    no_duplicates([d.name for d in disks], f"disk in {host}/{name}")
    no_duplicates([d.served_name for d in disks], f"served disk in {host}/{name}")
    return SnapshotEntry(
        host, name, check_int(raw.get("time_ns"), "time_ns", lo=MIN_TIME_NS), disks
    )


def _check_header(raw: object) -> tuple[dict[str, Any], int]:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ManifestError("malformed store metadata: not a backupfs store catalogue")
    version = raw.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS[:-1])) + f" and {READABLE_VERSIONS[-1]}"
        raise ManifestError(
            f"store format version {version!r} is not supported (this backupfs reads {readable})"
        )
    return raw, version


def _load_json(data: bytes) -> object:
    return _untrusted_json(data, MAX_CATALOGUE_BYTES)


def _snapshots(raw: dict[str, Any], version: int) -> tuple[SnapshotEntry, ...]:
    snaps_raw = raw.get("snapshots")
    if not isinstance(snaps_raw, list):
        raise ManifestError("malformed store metadata: snapshots is not a list")
    snapshots = tuple(parse_snapshot(s, version) for s in snaps_raw)
    no_duplicates([f"{s.host}/{s.name}" for s in snapshots], "snapshot")
    return snapshots


def parse_store_catalogue(data: bytes) -> Catalogue | HostIndex:
    """`backupfs-store.json` of any version: a whole catalogue (1, 2) or the hosts of a
    split one (3), whose parts parse_host_catalogue reads."""
    raw, version = _check_header(_load_json(data))
    if version == 3:
        return _host_index(raw)
    return Catalogue(_snapshots(raw, version))


def parse_catalogue(data: bytes) -> Catalogue:
    """A whole catalogue (versions 1 and 2)."""
    parsed = parse_store_catalogue(data)
    if isinstance(parsed, HostIndex):
        raise ManifestError(
            "malformed store metadata: a version 3 catalogue lists hosts, not snapshots"
        )
    return parsed


def _block_sizes(value: object, name: str) -> tuple[int, ...]:
    what = f"block_sizes of host {name}"
    if not isinstance(value, list) or len(value) > 64:
        raise ManifestError(f"malformed store metadata: {what} is not a short list")
    sizes = tuple(check_int(v, what, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE) for v in value)
    if any(size & (size - 1) for size in sizes) or len(set(sizes)) != len(sizes):
        raise ManifestError(f"malformed store metadata: {what} are not distinct powers of two")
    return sizes


def _host_entry(raw: object) -> HostEntry:
    if not isinstance(raw, dict):
        raise ManifestError("malformed store metadata: a host entry is not an object")
    name = check_name(raw.get("name"), "host")
    return HostEntry(
        name=name,
        catalogue_sha256=check_sha256_hex(raw, "catalogue_sha256", f"host {name}"),
        catalogue_size=check_int(
            raw.get("catalogue_size"), f"catalogue_size of host {name}", 0, MAX_CATALOGUE_BYTES
        ),
        snapshots=check_int(
            raw.get("snapshots"), f"snapshots of host {name}", 0, MAX_CATALOGUE_BYTES
        ),
        time_ns=check_int(raw.get("time_ns"), f"time_ns of host {name}", lo=MIN_TIME_NS),
        block_sizes=_block_sizes(raw.get("block_sizes"), name),
    )


def _probe(raw: object) -> ProbeEntry | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ManifestError("malformed store metadata: probe is not an object")
    path = _parent_path(raw.get("path"), "probe")
    return ProbeEntry(path, check_int(raw.get("size_bytes"), "size_bytes of probe"))


def _host_index(raw: dict[str, Any]) -> HostIndex:
    hosts_raw = raw.get("hosts")
    if not isinstance(hosts_raw, list):
        raise ManifestError("malformed store metadata: hosts is not a list")
    entries = [_host_entry(h) for h in hosts_raw]
    count: dict[str, int] = {}
    for entry in entries:
        count[entry.name] = count.get(entry.name, 0) + 1
    twice = {name for name, n in count.items() if n > 1}
    refused = tuple(
        (name, f"malformed store metadata: host {name} is listed more than once")
        for name in sorted(twice)
    )
    hosts = tuple(e for e in entries if e.name not in twice)
    return HostIndex(hosts, refused, _probe(raw.get("probe")))


def parse_host_catalogue(data: bytes, host: HostEntry) -> tuple[SnapshotEntry, ...]:
    """A host's part of a version 3 catalogue, whose bytes were checked against `host`
    (SHA-256 and size): its snapshots, all of that host, as many as the top level says."""
    raw, version = _check_header(_load_json(data))
    if version != 3 or raw.get("host") != host.name:
        raise ManifestError(
            f"malformed store metadata: the catalogue of host {host.name} is not a version 3 "
            "host part of that host"
        )
    snapshots = _snapshots(raw, ENTRY_VERSION)
    for snap in snapshots:
        if snap.host != host.name:
            raise ManifestError(
                f"malformed store metadata: the catalogue of host {host.name} lists a "
                f"snapshot of another host ({snap.host!r})"
            )
        for disk in (d for top in snap.disks for d in (top, *top.extents)):
            if disk.block_size not in host.block_sizes:
                raise ManifestError(
                    f"malformed store metadata: the catalogue of host {host.name} has a "
                    f"block size ({disk.block_size}) its store catalogue entry does not list"
                )
    if len(snapshots) != host.snapshots:
        raise ManifestError(
            f"malformed store metadata: the catalogue of host {host.name} lists "
            f"{len(snapshots)} snapshots, the store catalogue {host.snapshots}"
        )
    return snapshots


def parse_snapshot_meta(data: bytes) -> SnapshotEntry:
    raw, version = _check_header(_load_json(data))
    if version == 3:  # snapshot.json keeps the version 2 shape
        raise ManifestError("malformed store metadata: snapshot.json is never version 3")
    return parse_snapshot(raw.get("snapshot"), version)


def _header(version: int = ENTRY_VERSION) -> dict[str, Any]:
    return {"format": FORMAT, "version": version}


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


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1).encode() + b"\n"


def dump_catalogue(catalogue: Catalogue) -> bytes:
    """A whole catalogue, version 2 (what `index` wrote before version 3; tests and
    benchmarks make such stores)."""
    return _json(_header() | {"snapshots": [_snapshot_doc(s) for s in catalogue.snapshots]})


def dump_snapshot_meta(snapshot: SnapshotEntry) -> bytes:
    return _json(_header() | {"snapshot": _snapshot_doc(snapshot)})


def dump_host_catalogue(host: str, snapshots: list[SnapshotEntry]) -> bytes:
    """A host's part of a version 3 catalogue: its snapshot entries in the version 2 shape."""
    return _json(_header(3) | {"host": host, "snapshots": [_snapshot_doc(s) for s in snapshots]})


def _host_doc(host: str, snapshots: list[SnapshotEntry], part: bytes) -> dict[str, Any]:
    sizes = {d.block_size for s in snapshots for d in s.disks}
    sizes |= {e.block_size for s in snapshots for d in s.disks for e in d.extents}
    return {
        "name": host,
        "catalogue_sha256": hashlib.sha256(part).hexdigest(),
        "catalogue_size": len(part),
        "snapshots": len(snapshots),
        "time_ns": max(s.time_ns for s in snapshots),
        "block_sizes": sorted(sizes),
    }


def catalogue_files(catalogue: Catalogue) -> list[tuple[str, bytes]]:
    """The files of a version 3 catalogue, as (path relative to the store, content), in the
    order to write or upload them: each host's part, then the top level `CATALOGUE_NAME`
    LAST, so that a reader never finds a top level naming a part not there yet."""
    by_host: dict[str, list[SnapshotEntry]] = {}
    for snap in catalogue.snapshots:
        by_host.setdefault(snap.host, []).append(snap)
    files, hosts = [], []
    for host, snapshots in by_host.items():
        part = dump_host_catalogue(host, snapshots)
        files.append((host_catalogue_path(host), part))
        hosts.append(_host_doc(host, snapshots, part))
    top = _header(3) | {"hosts": hosts}
    first = next(((s, d) for s in catalogue.snapshots for d in s.disks), None)
    if first is not None:
        snap, disk = first
        top["probe"] = {
            "path": f"{snap.host}/{snap.name}/{disk.name}",
            "size_bytes": disk.size_bytes,
        }
    files.append((CATALOGUE_NAME, _json(top)))
    return files
