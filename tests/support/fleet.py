"""A fleet's store written as its catalogue only: HOSTS hosts of SNAPSHOTS snapshots of one
disk each, in store format 3 (or 2, whole), as `backupfs index` would write it. Only the
one image a mount probes exists (a Range GET of its first byte); the others are metadata
of images never read. Run it again with more snapshots and it writes what changed, the top
level last, as `index` does."""

import datetime
import hashlib
from pathlib import Path

from backupfs.linux.atomicfile import write_atomic
from backupfs.store import manifest
from backupfs.store.indexer import write_catalogue
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry

DISK = "disk0.img"
DISK_BYTES = 4096
_FIRST_DAY = datetime.datetime(2026, 1, 1, 3, 0, tzinfo=datetime.UTC)


def host_name(n: int) -> str:
    return f"host{n:04d}"


def snapshot_name(n: int) -> str:
    return (_FIRST_DAY + datetime.timedelta(days=n)).strftime("%Y-%m-%dT%H%MZ")


def fleet_catalogue(hosts: int, snapshots: int, more: dict[str, int] | None = None) -> Catalogue:
    """`hosts` × `snapshots`; `more` gives some hosts (also new ones) more snapshots."""
    counts = {host_name(h): snapshots for h in range(hosts)} | (more or {})
    entries = []
    for host, count in counts.items():
        for s in range(count):
            when = _FIRST_DAY + datetime.timedelta(days=s)
            time_ns = int(when.timestamp()) * 10**9
            digest = hashlib.sha256(f"{host}/{s}".encode()).hexdigest()  # never fetched
            disk = DiskEntry(DISK, DISK_BYTES, time_ns, 64 << 10, digest_index_sha256=digest)
            entries.append(SnapshotEntry(host, snapshot_name(s), time_ns, (disk,)))
    return Catalogue(tuple(entries))


def probe_path(catalogue: Catalogue) -> str:
    first = catalogue.snapshots[0]
    return manifest.image_path(first.host, first.name, first.disks[0].name)


def write_fleet(root: Path, catalogue: Catalogue, whole: bool = False) -> None:
    """The store's catalogue files (version 3, or 2 with `whole`) and the probed image."""
    probe = root / probe_path(catalogue)
    probe.parent.mkdir(parents=True, exist_ok=True)
    if not probe.exists():
        probe.write_bytes(b"\1" * DISK_BYTES)
    if whole:
        write_atomic(root / manifest.CATALOGUE_NAME, manifest.dump_catalogue(catalogue))
    else:
        write_catalogue(root, catalogue)
