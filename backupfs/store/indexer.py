"""`backupfs index STORE_DIR`: write the metadata that makes a directory of images servable.

Work is incremental: a snapshot whose images still have the size and mtime recorded in
its `.backupfs/snapshot.json` is not hashed again.
"""

import datetime
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from backupfs.errors import ManifestError, UserError
from backupfs.linux.atomicfile import atomic_writer, write_atomic
from backupfs.store import manifest
from backupfs.store.digestfile import INDEX_SUFFIX, write_digests
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry

log = logging.getLogger(__name__)
DEFAULT_BLOCK_SIZE = 64 << 10  # small reads fetch little; bench/run.py: no loss for large ones
IMAGE_SUFFIX = ".img"
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
    index_file = digest_file.with_name(digest_file.name + INDEX_SUFFIX)
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


def index_snapshot(
    store: Path, host: str, snap: str, block_size: int, say: Callable[[str], None]
) -> SnapshotEntry | None:
    snap_dir = store / host / snap
    images = []
    for path in sorted(snap_dir.iterdir()):
        if path.name == manifest.META_DIR:
            continue
        if not path.is_file():
            say(f"skipped {path}: not a regular file")
        elif not path.name.endswith(IMAGE_SUFFIX):
            say(f"skipped {path}: not a {IMAGE_SUFFIX} file (raw images are indexed by that name)")
        elif _usable_name(path, "disk", say):
            images.append(path)
    if not images:
        return None
    previous = _previous(snap_dir)
    known = {d.name: d for d in previous.disks} if previous else {}
    meta_dir = snap_dir / manifest.META_DIR
    meta_dir.mkdir(exist_ok=True)
    disks = []
    for image in images:
        st = image.stat()
        old = known.get(image.name)
        digest_file = store / manifest.digests_path(host, snap, image.name)
        if (
            old is not None
            and old.size_bytes == st.st_size
            and old.mtime_ns == st.st_mtime_ns
            and old.block_size == block_size
            and old.digest_index_sha256 is not None  # else a format 1 entry: hashed again
            and digest_file.exists()
            and digest_file.with_name(digest_file.name + INDEX_SUFFIX).exists()
        ):
            disks.append(old)
            continue
        say(f"hashing {host}/{snap}/{image.name} ({st.st_size} bytes)")
        index = hash_image(image, st.st_size, block_size, digest_file)
        disks.append(
            DiskEntry(
                name=image.name,
                size_bytes=st.st_size,
                mtime_ns=st.st_mtime_ns,
                block_size=block_size,
                digest_index_sha256=hashlib.sha256(index).hexdigest(),
            )
        )
    time_ns = snapshot_time_ns(snap, max(d.mtime_ns for d in disks))
    entry = SnapshotEntry(host=host, name=snap, time_ns=time_ns, disks=tuple(disks))
    if entry != previous:
        write_atomic(meta_dir / manifest.SNAPSHOT_META_NAME, manifest.dump_snapshot_meta(entry))
    return entry


def index_store(
    store: Path, block_size: int = DEFAULT_BLOCK_SIZE, say: Callable[[str], None] = print
) -> Catalogue:
    if not store.is_dir():
        raise UserError(f"{store}: not a directory")
    if not os.access(store, os.W_OK):
        raise UserError(f"{store}: not writable (index writes metadata next to the images)")
    snapshots = []
    _skip_stray_files(store, "not in a host directory", say)
    for host_dir in sorted(p for p in store.iterdir() if p.is_dir()):
        if not _usable_name(host_dir, "host", say):
            continue
        _skip_stray_files(host_dir, "not in a snapshot directory", say)
        for snap_dir in sorted(p for p in host_dir.iterdir() if p.is_dir()):
            if not _usable_name(snap_dir, "snapshot", say):
                continue
            entry = index_snapshot(store, host_dir.name, snap_dir.name, block_size, say)
            if entry is not None:
                snapshots.append(entry)
    catalogue = Catalogue(tuple(snapshots))
    write_atomic(store / manifest.CATALOGUE_NAME, manifest.dump_catalogue(catalogue))
    return catalogue
