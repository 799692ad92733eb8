"""`backupfs index s3://bucket/prefix/`: index a store where it lies, with no local copy.

The prefix is listed (ListObjectsV2); each new image is hashed by ranged GETs in
parallel, every GET pinned to the ETag the listing gave (`If-Match`: an object replaced
meanwhile fails the run instead of mixing two versions); formats and chains are read the
same way, through the layers' table reads. Then the digest files, chunk indexes and
snapshot entries are uploaded, and the catalogue last (docs/s3.md: a reader never sees
a catalogue naming objects that are not there yet). An image whose size and
LastModified match its snapshot entry, with its digest objects present, is not hashed
again.
"""

import concurrent.futures
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from backupfs.errors import FormatError, ManifestError, StoreError
from backupfs.ranges import block_count
from backupfs.remote.bucket import Bucket
from backupfs.remote.listing import StoredObject
from backupfs.store import manifest
from backupfs.store.chains import ParentMap
from backupfs.store.digestfile import INDEX_SUFFIX, ZERO_RECORD, chunk_index, record_of
from backupfs.store.formats import registry
from backupfs.store.formats.base import ParentRef, TableRead
from backupfs.store.formats.local import drive_open
from backupfs.store.indexer import IndexedSnapshot, resolve_parents, reused, snapshot_time_ns
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry
from backupfs.store.probing import NOT_AN_IMAGE, stored_format

PIECE_BYTES = 8 << 20  # one ranged GET while hashing
MAX_SNAPSHOT_META_BYTES = 16 << 20


@dataclass
class _Listed:
    """What the listing says of one snapshot directory."""

    images: dict[str, StoredObject]  # file name -> object
    meta: dict[str, StoredObject]  # name under .backupfs/ -> object


def _group(
    objects: list[StoredObject], say: Callable[[str], None]
) -> dict[tuple[str, str], _Listed]:
    snapshots: dict[tuple[str, str], _Listed] = {}
    for obj in objects:
        parts = obj.key.split("/")
        if obj.key in (manifest.CATALOGUE_NAME,) or parts[0] == manifest.META_DIR:
            continue
        if len(parts) == 4 and parts[2] == manifest.META_DIR:
            listed = snapshots.setdefault((parts[0], parts[1]), _Listed({}, {}))
            listed.meta[parts[3]] = obj
            continue
        if len(parts) != 3:
            say(f"skipped {obj.key}: not at HOST/SNAPSHOT/DISK")
            continue
        try:
            for part, what in zip(parts, ("host", "snapshot", "disk"), strict=True):
                manifest.check_name(part, what)
        except ManifestError as exc:
            say(f"skipped {obj.key}: {exc}")
            continue
        snapshots.setdefault((parts[0], parts[1]), _Listed({}, {})).images[parts[2]] = obj
    return snapshots


def _records(
    bucket: Bucket, key: str, obj: StoredObject, block_size: int, pool: concurrent.futures.Executor
) -> bytes:
    """The digest file of one object, hashed piece by piece in parallel."""
    size = obj.size
    piece = max(block_size, PIECE_BYTES // block_size * block_size)
    zeros = bytes(block_size)

    def hash_piece(start: int) -> bytes:
        data = bucket.get_range(key, start, min(start + piece, size), obj.etag, size)
        blocks = range(0, len(data), block_size)
        return b"".join(record_of(data[pos : pos + block_size], zeros) for pos in blocks)

    records = b"".join(pool.map(hash_piece, range(0, size, piece)))
    assert len(records) == block_count(block_size, size) * len(ZERO_RECORD)
    return records


@dataclass
class _Probe:
    format: str
    virtual_size: int | None = None
    parent: ParentRef | None = None
    extents: tuple[str, ...] = ()
    unique_id: str | None = None


def _probe(bucket: Bucket, host: str, snap: str, name: str, listed: _Listed) -> _Probe | str:
    """The image's format (and its tables' facts), or why it is not an image."""
    obj = listed.images[name]
    key = manifest.image_path(host, snap, name)
    size = obj.size
    head = bucket.get_range(key, 0, min(registry.HEAD_BYTES, size), obj.etag, size) if size else b""
    tail_start = max(0, size - registry.TAIL_BYTES)
    tail = bucket.get_range(key, tail_start, size, obj.etag, size) if size else b""
    fmt = stored_format(name, registry.detect(head, tail, size))
    if fmt is None:
        return NOT_AN_IMAGE
    if fmt == "raw":
        return _Probe("raw")
    layer = registry.LAYERS[fmt](name, size)
    files = [name]

    def sizes() -> list[int]:
        for extra in layer.files[len(files) - 1 :]:
            if extra not in listed.images:
                raise FormatError(f"{name}: its extent file {extra} is missing")
            files.append(extra)
        return [listed.images[f].size for f in files]

    def read_bytes(read: TableRead) -> bytes:
        file_obj = listed.images[files[read.file]]
        key = manifest.image_path(host, snap, files[read.file])
        end = read.offset + read.length
        return bucket.get_range(key, read.offset, end, file_obj.etag, file_obj.size)

    try:
        drive_open(layer, read_bytes, sizes, name)
        sizes()
    except FormatError as exc:
        return str(exc).removeprefix(f"{name}: ")
    unique_id = getattr(layer, "unique_id", None) or None
    return _Probe(fmt, layer.virtual_size, layer.parent, tuple(files[1:]), unique_id)


class BucketIndexer:
    def __init__(
        self, bucket: Bucket, block_size: int, connections: int, say: Callable[[str], None]
    ) -> None:
        self.bucket, self.block_size, self.say = bucket, block_size, say
        self.pool = concurrent.futures.ThreadPoolExecutor(connections)
        self.uploads: list[tuple[str, bytes]] = []  # before the catalogue, in this order
        self.hashed_bytes = 0

    def _previous(self, host: str, snap: str, listed: _Listed) -> SnapshotEntry | None:
        if manifest.SNAPSHOT_META_NAME not in listed.meta:
            return None
        data = self.bucket.get(manifest.snapshot_meta_path(host, snap), MAX_SNAPSHOT_META_BYTES)
        try:
            return None if data is None else manifest.parse_snapshot_meta(data)
        except ManifestError:
            return None

    def _entry(
        self, host: str, snap: str, name: str, listed: _Listed, old: DiskEntry | None
    ) -> DiskEntry:
        obj = listed.images[name]
        digest_name = f"{name}.sha256"
        there = digest_name in listed.meta and digest_name + INDEX_SUFFIX in listed.meta
        kept = reused(old, obj.size, obj.mtime_ns, self.block_size, there)
        if kept is not None:
            return kept
        self.say(f"hashing {host}/{snap}/{name} ({obj.size} bytes)")
        key = manifest.image_path(host, snap, name)
        records = _records(self.bucket, key, obj, self.block_size, self.pool)
        index = chunk_index(records)
        self.hashed_bytes += obj.size
        digest_key = manifest.digests_path(host, snap, name)
        self.uploads += [(digest_key, records), (digest_key + INDEX_SUFFIX, index)]
        return DiskEntry(name, obj.size, obj.mtime_ns, self.block_size,
                         digest_index_sha256=hashlib.sha256(index).hexdigest())  # fmt: skip

    def snapshot(self, host: str, snap: str, listed: _Listed) -> IndexedSnapshot | None:
        previous = self._previous(host, snap, listed)
        known = {d.name: d for d in previous.disks} if previous else {}
        probes: dict[str, _Probe] = {}
        for name in sorted(listed.images):
            found = _probe(self.bucket, host, snap, name, listed)
            if isinstance(found, str):
                self.say(f"skipped {host}/{snap}/{name}: {found}")
            else:
                probes[name] = found
        parts = {e for p in probes.values() for e in p.extents}
        disks: list[DiskEntry] = []
        parents: dict[str, ParentRef] = {}
        ids: dict[str, str] = {}
        for name, probe in probes.items():
            if name in parts:
                continue
            old = known.get(name)
            entry = self._entry(host, snap, name, listed, old)
            if probe.format != "raw":
                old_extents = {e.name: e for e in old.extents} if old else {}
                extents = tuple(self._entry(host, snap, e, listed, old_extents.get(e))
                                for e in probe.extents)  # fmt: skip
                entry = dataclasses.replace(
                    entry, format=probe.format, virtual_size=probe.virtual_size, extents=extents
                )
            if probe.parent is not None:
                parents[name] = probe.parent
            if probe.unique_id:
                ids[name] = probe.unique_id
            disks.append(entry)
        if not disks:
            return None
        return IndexedSnapshot(host, snap, disks, parents, previous, ids)

    def run(self, parent_maps: list[ParentMap]) -> Catalogue:
        objects = list(self.bucket.list())
        found: list[IndexedSnapshot] = []
        for (host, name), listed in sorted(_group(objects, self.say).items()):
            if listed.images:
                snapshot = self.snapshot(host, name, listed)
                if snapshot is not None:
                    found.append(snapshot)
        resolve_parents(found, parent_maps, self.say)
        entries = []
        for snap in found:
            if not snap.disks:
                continue
            time_ns = snapshot_time_ns(snap.name, max(d.mtime_ns for d in snap.disks))
            entry = SnapshotEntry(snap.host, snap.name, time_ns, tuple(snap.disks))
            if entry != snap.previous:
                meta = manifest.snapshot_meta_path(snap.host, snap.name)
                self.uploads.append((meta, manifest.dump_snapshot_meta(entry)))
            entries.append(entry)
        catalogue = Catalogue(tuple(entries))
        self._upload(self.uploads)
        for path, data in manifest.catalogue_files(catalogue):  # host parts, the top last
            self.bucket.put(path, data, "application/json")
        return catalogue

    def _upload(self, files: list[tuple[str, bytes]]) -> None:
        kinds = ["application/json" if p.endswith(".json") else "application/octet-stream"
                 for p, _ in files]  # fmt: skip
        list(self.pool.map(lambda f, k: self.bucket.put(f[0], f[1], k), files, kinds))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def index_bucket(
    bucket: Bucket,
    block_size: int,
    connections: int,
    say: Callable[[str], None] = print,
    parent_maps: list[ParentMap] | None = None,
) -> tuple[Catalogue, int]:
    """Index the bucket prefix; the catalogue and the bytes hashed."""
    indexer = BucketIndexer(bucket, block_size, connections, say)
    try:
        catalogue = indexer.run(parent_maps or [])
        return catalogue, indexer.hashed_bytes
    except StoreError:
        raise
    finally:
        indexer.close()
        bucket.close()
