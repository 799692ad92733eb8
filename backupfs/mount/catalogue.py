"""The store's catalogue as a mount sees it: hosts loaded on first use, new snapshots added.

A store in format 3 is mounted with its top level only: one directory per host. A host's
part is fetched on the first lookup or listing in its directory, once however many ask at
the same time (a lock per host), and so are the parts of other hosts its chains go down
into. Listing the root or a host directory re-reads the top level at most every
`catalogue_refresh` seconds (`If-None-Match`: an unchanged store costs a 304) and adds what
is new: hosts, snapshots, disks. Nothing a mount serves is ever changed or removed.

A host whose part is refused (it does not match the top level, or breaks the format) is
logged once, with one line, and its directory answers EIO until the store lists another
part for it; a host already served keeps serving what it had. A part that cannot be
fetched at all (the store is down) is no verdict: the next lookup tries again.

What is not loaded is not counted: statfs sums the disks of the hosts loaded so far.
"""

import errno
import logging
from dataclasses import dataclass, field

import trio

from backupfs.errors import ManifestError, StoreError
from backupfs.mount.tree import Tree
from backupfs.mount.view import ViewError
from backupfs.remote import metadata
from backupfs.remote.client import StoreClient
from backupfs.store.manifest import Catalogue, HostEntry, HostIndex, SnapshotEntry

log = logging.getLogger(__name__)


@dataclass
class _Host:
    pending: HostEntry | None = None  # a part to load into the tree; None: nothing to load
    loaded: bool = False  # some of its snapshots are in the tree: they stay served
    applied_sha256: str | None = None  # the part last put in the tree
    refused: tuple[str, str] | None = None  # (SHA-256 of the part, its one-line verdict)
    parsed: tuple[str, tuple[SnapshotEntry, ...]] | None = None  # fetched, not in the tree
    lock: trio.Lock = field(default_factory=trio.Lock)


def compatible(snapshots: tuple[SnapshotEntry, ...], block_size: int) -> list[SnapshotEntry]:
    """The snapshots without the disks a mount's `block_size=` cannot read (logged)."""
    if not block_size:
        return list(snapshots)
    kept = []
    for snap in snapshots:
        disks = []
        for disk in snap.disks:
            if block_size % disk.block_size:
                log.error("%s/%s/%s: left out: block_size=%d is not a multiple of its block "
                          "size (%d)", snap.host, snap.name, disk.name, block_size,
                          disk.block_size)  # fmt: skip
            else:
                disks.append(disk)
        kept.append(SnapshotEntry(snap.host, snap.name, snap.time_ns, tuple(disks)))
    return kept


class MountCatalogue:
    """Fills `tree` from the store's catalogue (tree.HostLoader)."""

    def __init__(
        self,
        store: StoreClient,
        tree: Tree,
        top: metadata.TopLevel,
        block_size: int,
        refresh_s: float,
    ) -> None:
        self.store, self.tree = store, tree
        self.block_size, self.refresh_s = block_size, refresh_s
        self._hosts: dict[str, _Host] = {}
        self._etag, self._sha256 = top.etag, top.sha256
        self._checked_s = trio.current_time()
        self._refreshing: trio.Event | None = None
        self._changed = False  # what the last refresh found
        self.apply(top.catalogue)

    # --- what the catalogue says ---

    def apply(self, catalogue: Catalogue | HostIndex) -> None:
        """Add what is new in the catalogue: a whole one's snapshots, or a top level's new
        hosts (and parts to load later for the hosts whose part changed)."""
        if isinstance(catalogue, Catalogue):
            self.tree.add_snapshots(compatible(catalogue.snapshots, self.block_size))
            for name in {s.host for s in catalogue.snapshots}:
                host = self._hosts.setdefault(name, _Host())
                host.loaded, host.pending = True, None
                self.tree.mark_loaded(name)
        else:
            for name, message in catalogue.refused:
                self._refuse_twice_listed(name, message)
            for entry in catalogue.hosts:
                self._listed(entry)

    def _refuse_twice_listed(self, name: str, message: str) -> None:
        host = self._hosts.setdefault(name, _Host())
        if host.refused is None or host.refused[0] != "":
            log.error("%s: %s", self.store.base_url, message)
        host.refused, host.pending = ("", message), None
        if not host.loaded:
            self.tree.add_host(name, 0, 0)

    def _listed(self, entry: HostEntry) -> None:
        host = self._hosts.setdefault(entry.name, _Host())
        if entry.catalogue_sha256 == host.applied_sha256:  # back to what the tree has
            host.pending = None
            return
        if host.pending is not None and host.pending.catalogue_sha256 == entry.catalogue_sha256:
            return
        host.pending = entry
        if not host.loaded:
            node = self.tree.add_host(entry.name, entry.time_ns, entry.snapshots)
            node.mtime_ns = entry.time_ns
            self.tree.unloaded[node.inode] = entry.snapshots

    # --- hosts on demand ---

    async def ensure_host(self, name: str) -> None:
        host = self._hosts.get(name)
        if host is None:
            return
        parsed = None if host.pending is None else await self._parse(host)
        if parsed is None:
            if host.refused is not None and not host.loaded:
                raise ViewError(errno.EIO)
            return
        sha, snapshots = parsed
        await self._load_parents(snapshots)
        self.tree.add_snapshots(compatible(snapshots, self.block_size))
        self.tree.mark_loaded(name)
        host.loaded, host.applied_sha256, host.parsed = True, sha, None
        if host.pending is not None and host.pending.catalogue_sha256 == sha:
            host.pending = None

    async def _parse(self, host: _Host) -> tuple[str, tuple[SnapshotEntry, ...]] | None:
        """The SHA-256 and snapshots of the host's pending part, fetched once however many ask; None
        when it is refused. A refused part may be one the store replaced since its top
        level was read (`backupfs index` ran again): the top level is read again once, and
        the part it names now tried."""
        async with host.lock:
            for _ in range(2):
                entry = host.pending
                if entry is None:
                    return None
                sha = entry.catalogue_sha256
                if host.parsed is not None and host.parsed[0] == sha:
                    return host.parsed
                if host.refused is not None and host.refused[0] == sha:
                    return None
                try:
                    snapshots = await metadata.load_host(self.store, entry)
                except ManifestError as exc:
                    await self.refresh(force=True)
                    if host.pending is not None and host.pending.catalogue_sha256 != sha:
                        continue
                    log.error("%s", exc)
                    host.refused = (sha, str(exc))
                    return None
                host.parsed = (sha, snapshots)
                self.tree.table.register(snapshots)
                return host.parsed
            return None

    async def _load_parents(self, snapshots: tuple[SnapshotEntry, ...]) -> None:
        """Fetch the parts of the other hosts these snapshots' chains go down into (their
        disk entries are what the chains are built of)."""
        todo = [d.parent for s in snapshots for d in s.disks if d.parent is not None]
        seen: set[str] = set()
        tried: set[str] = set()
        entries = self.tree.table.entries
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            if path in entries:
                parent = entries[path].parent
                if parent is not None:
                    todo.append(parent)
                continue
            name = path.split("/", 1)[0]
            host = self._hosts.get(name)
            if name in tried or host is None or host.pending is None:
                continue
            tried.add(name)
            if await self._parse(host) is not None:
                seen.discard(path)
                todo.append(path)

    # --- new snapshots ---

    async def refresh(self, force: bool = False) -> bool:
        if self._refreshing is not None:  # one at a time: the others wait for it
            await self._refreshing.wait()
            return self._changed
        now = trio.current_time()
        if not force and now - self._checked_s < self.refresh_s:
            return False
        self._checked_s = now
        self._refreshing = done = trio.Event()
        self._changed = False
        try:
            top = await metadata.load_top_level(self.store, self._etag)
            if top is not None and top.sha256 != self._sha256:
                self._etag, self._sha256 = top.etag, top.sha256
                self.apply(top.catalogue)
                self._changed = True
                log.info("the store's catalogue changed: new entries added")
        except StoreError as exc:  # the mount goes on with what it has
            log.warning("catalogue refresh: %s", exc)
        finally:
            self._refreshing = None
            done.set()
        return self._changed
