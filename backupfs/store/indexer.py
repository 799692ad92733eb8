"""`backupfs index STORE_DIR`: write the metadata that makes a directory of images servable.

Each file's format comes from its header (probing.py); chains are resolved across the
whole store (chains.py). Work is incremental: an image that still has the size and mtime
recorded in its snapshot's `.backupfs/snapshot.json` is not hashed again.
"""

import dataclasses
import datetime
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backupfs.errors import ManifestError, UserError
from backupfs.linux.atomicfile import atomic_writer, write_atomic
from backupfs.store import manifest
from backupfs.store.chains import ParentMap, broken_chains, resolve_parent
from backupfs.store.digestfile import index_path_of, write_digests
from backupfs.store.formats.base import ParentRef
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry
from backupfs.store.probing import find_images

log = logging.getLogger(__name__)
DEFAULT_BLOCK_SIZE = 64 << 10  # small reads fetch little; bench/run.py: no loss for large ones
IMAGE_SUFFIX = ".img"
_NAME_MAX = 255  # bytes in a file name
_SNAPSHOT_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T_ ](\d{2}):?(\d{2})(?::?(\d{2}))?)?Z?")


def snapshot_time_ns(name: str, fallback_ns: int) -> int:
    """Time encoded in a snapshot name such as 2026-11-20T0300Z (UTC), else `fallback_ns`."""
    m = _SNAPSHOT_TIME.fullmatch(name)
    if not m:
        return fallback_ns
    fields = [int(g) if g else 0 for g in m.groups()]
    try:
        year, month, day, hour, minute, second = fields
        when = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
    except ValueError:  # 2026-02-31 and the like
        return fallback_ns
    return int(when.timestamp()) * 1_000_000_000


def hash_image(image: Path, size: int, block_size: int, digest_file: Path) -> bytes:
    """Write the image's digest file (digestfile.py) and its chunk index; return the index."""
    index_file = index_path_of(digest_file)
    with open(image, "rb", buffering=0) as f, atomic_writer(digest_file) as out:
        index = write_digests(f, size, block_size, out)
    write_atomic(index_file, index)
    return index


def _usable_name(path: Path, what: str, say: Callable[[str], None]) -> bool:
    try:
        manifest.check_name(path.name, what)
    except ManifestError as exc:
        say(f"skipped {path}: {exc}")
        return False
    return True


def _skip_stray_files(directory: Path, where: str, say: Callable[[str], None]) -> None:
    """Say which files sit where no image is looked for, so a misplaced image is noticed."""
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        if path.name != manifest.CATALOGUE_NAME:
            say(f"skipped {path}: {where} (images go in STORE/HOST/SNAPSHOT/DISK{IMAGE_SUFFIX})")


def _previous(snap_dir: Path) -> SnapshotEntry | None:
    meta = snap_dir / manifest.META_DIR / manifest.SNAPSHOT_META_NAME
    try:
        return manifest.parse_snapshot_meta(meta.read_bytes())
    except (OSError, ManifestError):
        return None


def reused(
    old: DiskEntry | None, size: int, mtime_ns: int, block_size: int, digests_there: bool
) -> DiskEntry | None:
    """`old`'s entry (without its chain, found again) when the file did not change since it
    was hashed: same size, mtime and block size, a format 2 entry, its digest files there."""
    if (
        old is None
        or (old.size_bytes, old.mtime_ns, old.block_size) != (size, mtime_ns, block_size)
        or old.digest_index_sha256 is None  # a format 1 entry: hashed again
        or not digests_there
    ):
        return None
    return DiskEntry(old.name, old.size_bytes, old.mtime_ns, old.block_size,
                     digest_index_sha256=old.digest_index_sha256)  # fmt: skip


def _hashed(
    path: Path, block_size: int, old: DiskEntry | None, say: Callable[[str], None]
) -> DiskEntry:
    """The stored file's entry, with its digest file and chunk index written, or `old`'s
    when the file did not change since (same size, mtime and block size, files there)."""
    st = path.stat()
    store, (host, snap, name) = path.parents[2], path.parts[-3:]
    digest_file = store / manifest.digests_path(host, snap, name)
    digests_there = digest_file.exists() and index_path_of(digest_file).exists()
    kept = reused(old, st.st_size, st.st_mtime_ns, block_size, digests_there)
    if kept is not None:
        return kept
    say(f"hashing {host}/{snap}/{name} ({st.st_size} bytes)")
    index = hash_image(path, st.st_size, block_size, digest_file)
    return DiskEntry(
        name=path.name,
        size_bytes=st.st_size,
        mtime_ns=st.st_mtime_ns,
        block_size=block_size,
        digest_index_sha256=hashlib.sha256(index).hexdigest(),
    )


@dataclass
class IndexedSnapshot:
    host: str
    name: str
    disks: list[DiskEntry]
    parents: dict[str, ParentRef]  # disk name -> the parent it names
    previous: SnapshotEntry | None
    ids: dict[str, str] = dataclasses.field(default_factory=dict)  # disk name -> unique id


def index_snapshot(
    store: Path, host: str, snap: str, block_size: int, say: Callable[[str], None]
) -> IndexedSnapshot | None:
    """Hash what changed in one snapshot directory; parents are resolved by index_store."""
    snap_dir = store / host / snap
    images = find_images(snap_dir, say)
    if not images:
        return None
    previous = _previous(snap_dir)
    known = {d.name: d for d in previous.disks} if previous else {}
    (snap_dir / manifest.META_DIR).mkdir(exist_ok=True)
    disks, parents = [], {}
    for image in images:
        old = known.get(image.path.name)
        old_extents = {e.name: e for e in old.extents} if old else {}
        entry = _hashed(image.path, block_size, old, say)
        extents = tuple(_hashed(e, block_size, old_extents.get(e.name), say) for e in image.extents)
        if image.format != "raw":
            entry = dataclasses.replace(
                entry, format=image.format, virtual_size=image.virtual_size, extents=extents
            )
        if image.parent is not None:
            parents[entry.name] = image.parent
        disks.append(entry)
    ids = {i.path.name: i.unique_id for i in images if i.unique_id}
    return IndexedSnapshot(host, snap, disks, parents, previous, ids)


def resolve_parents(
    snapshots: list[IndexedSnapshot], maps: list[ParentMap], say: Callable[[str], None]
) -> None:
    """Set each disk's parent to the store path of the image it names; leave out (and
    say) the disks whose parent is not in the store and those whose chain is broken."""
    known = {f"{s.host}/{s.name}/{d.name}": d for s in snapshots for d in s.disks}
    ids = {f"{s.host}/{s.name}/{name}": i for s in snapshots for name, i in s.ids.items()}
    parents: dict[str, str | None] = {}
    for snap in snapshots:
        for disk in snap.disks:
            path, ref = f"{snap.host}/{snap.name}/{disk.name}", snap.parents.get(disk.name)
            try:
                parents[path] = None if ref is None else _parent_of(ref, snap, known, ids, maps)
            except ValueError as exc:
                say(f"skipped {snap.host}/{snap.name}/{disk.name}: {exc}")
    bad = broken_chains(parents)
    for path, reason in sorted(bad.items()):
        say(f"skipped {path}: {reason}")
    for snap in snapshots:
        kept = []
        for disk in snap.disks:
            path = f"{snap.host}/{snap.name}/{disk.name}"
            if path in parents and path not in bad:
                kept.append(dataclasses.replace(disk, parent=parents[path]))
        snap.disks = kept


def _parent_of(
    ref: ParentRef,
    snap: IndexedSnapshot,
    known: dict[str, DiskEntry],
    ids: dict[str, str],
    maps: list[ParentMap],
) -> str:
    """The store path of the parent `ref` names; when the image names its parent by id as
    well (VHD, VHDX), the image found there must carry that id: a parent replaced by
    another image under the same name would give wrong bytes."""
    found = resolve_parent(ref.path, f"{snap.host}/{snap.name}", known, maps)
    if ref.uuid and found in ids and ids[found].lower() != ref.uuid.lower():
        raise ValueError(f"parent {found} is not the image it was made from (its id is "
                         f"{ids[found]}, the image names {ref.uuid})")  # fmt: skip
    return found


def _entry(snap: IndexedSnapshot, store: Path) -> SnapshotEntry:
    time_ns = snapshot_time_ns(snap.name, max((d.mtime_ns for d in snap.disks), default=0))
    entry = SnapshotEntry(snap.host, snap.name, time_ns, tuple(snap.disks))
    if entry != snap.previous:
        meta = store / snap.host / snap.name / manifest.META_DIR / manifest.SNAPSHOT_META_NAME
        write_atomic(meta, manifest.dump_snapshot_meta(entry))
    return entry


def index_store(
    store: Path,
    block_size: int = DEFAULT_BLOCK_SIZE,
    say: Callable[[str], None] = print,
    parent_maps: list[ParentMap] | None = None,
) -> Catalogue:
    if not store.is_dir():
        raise UserError(f"{store}: not a directory")
    if not os.access(store, os.W_OK):
        raise UserError(f"{store}: not writable (index writes metadata next to the images)")
    found: list[IndexedSnapshot] = []
    _skip_stray_files(store, "not in a host directory", say)
    for host_dir in sorted(p for p in store.iterdir() if p.is_dir()):
        if host_dir.name == manifest.META_DIR:  # the catalogue's host parts
            continue
        if not _usable_name(host_dir, "host", say) or not _part_fits(host_dir, say):
            continue
        _skip_stray_files(host_dir, "not in a snapshot directory", say)
        for snap_dir in sorted(p for p in host_dir.iterdir() if p.is_dir()):
            if not _usable_name(snap_dir, "snapshot", say):
                continue
            snap = index_snapshot(store, host_dir.name, snap_dir.name, block_size, say)
            if snap is not None:
                found.append(snap)
    resolve_parents(found, parent_maps or [], say)
    catalogue = Catalogue(tuple(_entry(s, store) for s in found if s.disks))
    write_catalogue(store, catalogue)
    return catalogue


def _part_fits(host_dir: Path, say: Callable[[str], None]) -> bool:
    """A host's catalogue part is named after it, `.json` added: that must be a file name."""
    part = Path(manifest.host_catalogue_path(host_dir.name)).name
    if len(part.encode()) > _NAME_MAX:
        longest = _NAME_MAX - len(manifest.HOST_PART_SUFFIX)
        say(f"skipped {host_dir}: a host name of over {longest} bytes leaves no room for the "
            "name of its catalogue part")  # fmt: skip
        return False
    return True


def _replace(path: Path, data: bytes) -> None:
    """write_atomic with a short temporary name: a host part's own name may be 255 bytes."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() makes the files write_atomic writes
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_catalogue(store: Path, catalogue: Catalogue) -> None:
    """The catalogue in store format 3: each host's part, then the top level, each written
    atomically (a part that is already as it should be is left alone: its ETag stays). The
    parts of hosts no longer in the store are removed once the top level no longer names
    them."""
    hosts_dir = store / manifest.HOSTS_DIR
    hosts_dir.mkdir(parents=True, exist_ok=True)
    written = set()
    for rel, data in manifest.catalogue_files(catalogue):
        path = store / rel
        written.add(path.name)
        try:
            if path.read_bytes() == data:
                continue
        except OSError:
            pass
        _replace(path, data)
    for stale in hosts_dir.iterdir():
        if stale.name.endswith(manifest.HOST_PART_SUFFIX) and stale.name not in written:
            stale.unlink(missing_ok=True)
