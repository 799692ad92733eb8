"""`find`, `log` and `cat`: what each snapshot's filesystems hold at a path or a pattern.

Snapshots are searched in parallel (a few at a time, each walk with its own reads in
flight); a snapshot whose disk or filesystem cannot be read is named in one line and the
others are still reported (`Report.errors`).
"""

import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio

from backupfs.errors import StoreError, UserError
from backupfs.plan.fsmeta import FileInfo, FsError
from backupfs.snapshots.files import file_bytes, sha256_of
from backupfs.snapshots.filesystems import Filesystem, filesystems
from backupfs.snapshots.session import Read, Session
from backupfs.snapshots.walk import lookup, matches, walk
from backupfs.store.manifest import SnapshotEntry
from backupfs.units import utc

PARALLEL_SNAPSHOTS = 4


@dataclass
class Report:
    rows: list[dict[str, object]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Place:
    """One filesystem of one disk of one snapshot, ready to read."""

    snapshot: SnapshotEntry
    disk: str  # the served name
    fs: Filesystem
    read: Read

    @property
    def where(self) -> str:
        return f"{self.snapshot.host}/{self.snapshot.name}/{self.disk}:{self.fs.partition}"


def kind_of(info: FileInfo) -> str:
    return {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}.get(
        stat.S_IFMT(info.mode), "other"
    )


def row(place: Place, path: str, info: FileInfo) -> dict[str, object]:
    return {
        "snapshot": f"{place.snapshot.host}/{place.snapshot.name}",
        "disk": place.disk,
        "partition": place.fs.partition,
        "path": path,
        "type": kind_of(info),
        "mode": f"{stat.S_IMODE(info.mode):04o}",
        "uid": info.uid,
        "gid": info.gid,
        "size": info.size,
        "mtime": utc(info.mtime_ns),
        "mtime_ns": info.mtime_ns,
    }


async def places(
    session: Session, snap: SnapshotEntry, report: Report, disk: str | None = None
) -> list[Place]:
    """The readable filesystems of a snapshot's disks (or of one disk)."""
    found = []
    for entry in snap.disks:
        if disk is not None and entry.served_name != disk:
            continue
        path = f"{snap.host}/{snap.name}/{entry.served_name}"
        try:
            served = await session.open_disk(path)
        except (StoreError, UserError) as exc:
            report.errors.append(f"{path}: {exc}")
            continue
        read = session.reader(served)

        def say(line: str, path: str = path) -> None:
            report.errors.append(f"{path}:{line}")

        try:
            fss = await trio.to_thread.run_sync(filesystems, read, served.size_bytes, say)
        except (FsError, StoreError, OSError) as exc:
            report.errors.append(f"{path}: {exc}")
            continue
        found += [Place(snap, entry.served_name, fs, read) for fs in fss]
    return found


async def _each_place(
    session: Session,
    snapshots: list[SnapshotEntry],
    report: Report,
    work: Callable[[Place], list[dict[str, object]]],
) -> list[list[dict[str, object]]]:
    """`work` on every filesystem of every snapshot, in a worker thread each, a few
    snapshots at a time; results in the snapshots' order."""
    limiter = trio.CapacityLimiter(PARALLEL_SNAPSHOTS)  # snapshots at once (not threads)
    results: list[list[dict[str, object]]] = [[] for _ in snapshots]

    async def one(i: int, snap: SnapshotEntry) -> None:
        async with limiter:
            for place in await places(session, snap, report):
                try:
                    results[i] += await trio.to_thread.run_sync(work, place)
                except (FsError, StoreError) as exc:
                    report.errors.append(f"{place.where}: {exc}")

    async with trio.open_nursery() as nursery:
        for i, snap in enumerate(snapshots):
            nursery.start_soon(one, i, snap)
    return results


async def find(
    session: Session, snapshots: list[SnapshotEntry], pattern: str, hash_files: bool
) -> Report:
    report = Report()

    def work(place: Place) -> list[dict[str, object]]:
        out = []
        for found in walk(place.fs.fs):
            if found.path != "/" and matches(pattern, found.path):
                entry = row(place, found.path, found.info)
                if hash_files and found.info.is_file:
                    entry["sha256"] = sha256_of(place.fs.fs, place.read, found.info)
                out.append(entry)
        return out

    for rows in await _each_place(session, snapshots, report, work):
        report.rows += rows
    return report


def _version_key(entry: dict[str, object]) -> tuple[object, ...]:
    if "sha256" in entry:
        return (entry["type"], entry["sha256"])
    return (entry["type"], entry["size"], entry["mtime_ns"], entry["mode"])


async def log(
    session: Session, snapshots: list[SnapshotEntry], path: str, hash_files: bool
) -> Report:
    """One row per distinct version of `path`: the first and last snapshot holding it
    (consecutive snapshots with the same version), its size, mtime and, with --hash, its
    SHA-256. Without --hash a version is its type, size, mtime and mode."""
    report = Report()

    def work(place: Place) -> list[dict[str, object]]:
        info = lookup(place.fs.fs, path)
        if info is None:
            return []
        entry = row(place, "/" + path.strip("/"), info)
        if hash_files and info.is_file:
            entry["sha256"] = sha256_of(place.fs.fs, place.read, info)
        return [entry]

    versions: list[dict[str, object]] = []
    open_version: dict[tuple[object, object], dict[str, object]] = {}  # by disk, partition
    for rows in await _each_place(session, snapshots, report, work):
        here = {(e["disk"], e["partition"]): e for e in reversed(rows)}
        for where in list(open_version):
            if where not in here:  # absent from this snapshot: the version ends
                del open_version[where]
        for where, entry in here.items():
            current = open_version.get(where)
            if current is not None and _version_key(current) == _version_key(entry):
                current["last"] = entry["snapshot"]
                continue
            version = {**entry, "first": entry["snapshot"], "last": entry["snapshot"]}
            versions.append(version)
            open_version[where] = version
    report.rows = versions
    return report


async def cat_places(session: Session, spec: str) -> tuple[Report, list[Place], str]:
    """The filesystems `host/snapshot/disk[:pN]:/path` can mean, and the path in them."""
    left, sep, path = spec.partition(":/")
    disk_spec, _, partition = left.rpartition(":") if left.count(":") else (left, "", "")
    if not sep or disk_spec.count("/") != 2:
        raise UserError(f"{spec}: expected HOST/SNAPSHOT/DISK[:pN]:/PATH")
    host, snap_name, disk = disk_spec.split("/")
    snap = next((s for s in session.snapshots if (s.host, s.name) == (host, snap_name)), None)
    if snap is None:
        raise UserError(f"no snapshot {host}/{snap_name} in the store")
    report = Report()
    found = [p for p in await places(session, snap, report, disk)
             if not partition or p.fs.partition == partition]  # fmt: skip
    return report, found, "/" + path


def read_file(place: Place, path: str) -> Iterator[bytes]:
    info = lookup(place.fs.fs, path)
    if info is None:
        raise UserError(f"{place.where}:{path}: no such file")
    if not info.is_file:
        raise UserError(f"{place.where}:{path}: not a regular file ({kind_of(info)})")
    return file_bytes(place.fs.fs, place.read, info)
