"""The mounted tree `<host>/<snapshot>/<disk>.img` as plain data; it knows nothing of FUSE.

It only grows: hosts, snapshots and disks are added (at mount, when a host's part of the
catalogue is first needed, when the catalogue changes), never changed or removed, so an
inode, once given, keeps meaning the same file for the life of the mount.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

from backupfs.errors import ManifestError
from backupfs.mount.volumes import VolumeTable
from backupfs.store.chains import MAX_CHAIN_DEPTH
from backupfs.store.image import ChainLink, Image, VirtualDisk, stored_images
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry, digests_path, image_path

log = logging.getLogger(__name__)

ROOT_INODE = 1


@dataclass
class Node:
    inode: int
    name: str
    mtime_ns: int
    children: dict[str, int] = field(default_factory=dict)  # name -> inode, for directories
    image: Image | VirtualDisk | None = None  # for files: a raw image, or a guest's disk
    parent: int = 0  # the directory's inode (0 for the root)

    @property
    def is_dir(self) -> bool:
        return self.image is None

    @property
    def size_bytes(self) -> int:
        return self.image.size_bytes if self.image is not None else 0


class HostLoader(Protocol):
    """What fills a tree's hosts on demand (mount/catalogue.py): a store whose catalogue is
    split by host (store format 3) is mounted with only its hosts' directories."""

    async def ensure_host(self, host: str) -> None:
        """Put the host's snapshots in the tree, if they are not there yet."""

    async def refresh(self, force: bool = False) -> bool:
        """Read the store's catalogue again, at most so often (unless `force`), and add
        what is new; whether anything was added."""


class Tree:
    def __init__(self, base_url: str = "", block_size: int = 0) -> None:
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", 0)}
        self.volumes = VolumeTable()  # served under the control directory (volumes.py)
        self.table = ImageTable(base_url, block_size)
        self.hosts: dict[str, int] = {}  # host name -> its directory's inode
        # Hosts whose snapshots are not in the tree yet -> how many the catalogue says
        self.unloaded: dict[int, int] = {}
        self.loader: HostLoader | None = None  # None: the tree holds the whole catalogue

    def add(
        self, parent: int, name: str, mtime_ns: int, image: Image | VirtualDisk | None = None
    ) -> Node:
        node = Node(len(self.nodes) + 1, name, mtime_ns, image=image, parent=parent)
        self.nodes[node.inode] = node
        parent_node = self.nodes[parent]
        parent_node.children[name] = node.inode
        parent_node.mtime_ns = max(parent_node.mtime_ns, mtime_ns)
        return node

    def lookup(self, parent: int, name: str) -> Node | None:
        inode = self.nodes[parent].children.get(name)
        return None if inode is None else self.nodes[inode]

    def find(self, rel: str) -> Node | None:
        """The node at `rel` ("HOST/SNAPSHOT/DISK.img"), or None. Only what is in the tree:
        `load_path` first puts there the host that `rel` names."""
        node = self.nodes[ROOT_INODE]
        for name in rel.split("/"):
            found = self.lookup(node.inode, name)
            if found is None:
                return None
            node = found
        return node

    async def load_path(self, rel: str) -> None:
        """Make sure the host that `rel` starts with is in the tree (a split catalogue's
        host is fetched on first use); failures are left to `find` to answer None."""
        host = rel.split("/", 1)[0]
        if self.loader is not None and host in self.hosts:
            try:
                await self.loader.ensure_host(host)
            except Exception as exc:  # refused or unreachable: logged where it was decided
                log.debug("loading host %s for %s: %s", host, rel, exc)

    def path_of(self, inode: int) -> str | None:
        """The path of a node ("HOST/SNAPSHOT/DISK.img"), or None."""
        node = self.nodes.get(inode)
        if node is None or inode == ROOT_INODE:
            return None
        names = []
        while node.inode != ROOT_INODE:
            names.append(node.name)
            node = self.nodes[node.parent]
        return "/".join(reversed(names))

    def host_name(self, inode: int) -> str | None:
        """The host whose directory `inode` is, or None."""
        node = self.nodes.get(inode)
        if node is None or node.parent != ROOT_INODE:
            return None
        return node.name

    def subdirs(self, node: Node) -> int:
        """How many directories `node` holds (for its link count): a host not yet loaded
        counts the snapshots the catalogue gives it."""
        if node.inode in self.unloaded:
            return self.unloaded[node.inode]
        return sum(self.nodes[i].is_dir for i in node.children.values())

    def images(self) -> list[Image | VirtualDisk]:
        """What each file serves."""
        return [n.image for n in self.nodes.values() if n.image is not None]

    def stored_images(self) -> list[Image]:
        """The stored files behind the served ones, each once."""
        seen: dict[int, Image] = {}
        for served in self.images():
            seen.update((i.image_id, i) for i in stored_images(served))
        return list(seen.values())

    def add_host(self, name: str, mtime_ns: int = 0, snapshots: int | None = None) -> Node:
        """The host's directory (made if new); with `snapshots`, a host whose snapshots are
        to be loaded later (`snapshots` is how many the catalogue says it has)."""
        if name in self.hosts:
            return self.nodes[self.hosts[name]]
        node = self.add(ROOT_INODE, name, 0)
        node.mtime_ns = mtime_ns
        self.hosts[name] = node.inode
        if snapshots is not None:
            self.unloaded[node.inode] = snapshots
        return node

    def add_snapshots(self, snapshots: Iterable[SnapshotEntry]) -> None:
        """Add the snapshots and disks not in the tree yet; what is there stays as it is (a
        disk whose entry changed keeps the one first served: its image may not change while
        mounted). A disk whose chain is broken is left out, and logged."""
        snapshots = list(snapshots)
        self.table.register(snapshots)
        for snap in snapshots:
            host = self.add_host(snap.host)
            self.unloaded.pop(host.inode, None)
            snap_node = self.lookup(host.inode, snap.name)
            if snap_node is None:
                snap_node = self.add(host.inode, snap.name, snap.time_ns)
            for disk in snap.disks:
                path = f"{snap.host}/{snap.name}/{disk.name}"
                if disk.served_name in snap_node.children:
                    if self.table.entries.get(path) != disk:
                        log.info("%s changed in the catalogue: still serving it as mounted", path)
                    continue
                try:
                    served = self.table.served(path, disk, len(self.nodes) + 1)
                except ManifestError as exc:
                    log.error("%s", exc)
                    continue
                self.add(snap_node.inode, disk.served_name, snap.time_ns, served)

    def mark_loaded(self, host: str) -> None:
        """The host's snapshots are all in the tree (it may have none left to add)."""
        self.unloaded.pop(self.hosts[host], None)


class ImageTable:
    """One Image per stored file, by store path, shared by every chain; the catalogue's disk
    entries by path (a chain's parent may be in another host: see mount/catalogue.py)."""

    def __init__(self, base_url: str, block_size: int) -> None:
        self.base_url, self.block_size = base_url, block_size
        self.entries: dict[str, DiskEntry] = {}
        self._made: dict[str, Image] = {}

    def register(self, snapshots: Iterable[SnapshotEntry]) -> None:
        """Know these disks' entries (the first one seen of a path stays)."""
        for snap in snapshots:
            for disk in snap.disks:
                self.entries.setdefault(f"{snap.host}/{snap.name}/{disk.name}", disk)

    def image(self, path: str, disk: DiskEntry) -> Image:
        if path not in self._made:
            host, snap, name = path.split("/")
            self._made[path] = Image(
                image_id=len(self._made) + 1,
                url=self.base_url + quote(image_path(host, snap, name)),
                size_bytes=disk.size_bytes,
                block_size=self.block_size or disk.block_size,
                digest_block_size=disk.block_size,
                digests_path=digests_path(host, snap, name),
                digests_sha256=disk.digests_sha256,
                digest_index_sha256=disk.digest_index_sha256,
            )
        return self._made[path]

    def link(self, path: str, disk: DiskEntry) -> ChainLink:
        host, snap, _ = path.split("/")
        extents = [self.image(f"{host}/{snap}/{e.name}", e) for e in disk.extents]
        return ChainLink(disk.format, [self.image(path, disk), *extents])

    def served(self, path: str, disk: DiskEntry, disk_id: int) -> Image | VirtualDisk:
        """A raw disk's Image, or the VirtualDisk of a chain; ManifestError when the
        catalogue's chain is broken (it is not trusted: it may loop or name nothing)."""
        if disk.format == "raw":
            return self.image(path, disk)
        links, here, entry = [], path, disk
        while True:
            links.append(self.link(here, entry))
            if entry.parent is None:
                break
            if len(links) > MAX_CHAIN_DEPTH or entry.parent not in self.entries:
                raise ManifestError(f"{path}: its chain is broken at {entry.parent}")
            here, entry = entry.parent, self.entries[entry.parent]
        return VirtualDisk(disk_id, path, disk.served_size, links)


def build_tree(catalogue: Catalogue, base_url: str, block_size: int) -> Tree:
    """One directory per host and snapshot of a whole catalogue; `block_size` 0 means each
    disk's store block size. A disk whose chain the catalogue breaks is left out (and
    logged)."""
    tree = Tree(base_url, block_size)
    tree.add_snapshots(catalogue.snapshots)
    return tree
