"""The mounted tree `<host>/<snapshot>/<disk>.img` as plain data; it knows nothing of FUSE."""

import logging
from dataclasses import dataclass, field
from urllib.parse import quote

from backupfs.errors import ManifestError
from backupfs.mount.volumes import VolumeTable
from backupfs.store.chains import MAX_CHAIN_DEPTH
from backupfs.store.image import ChainLink, Image, VirtualDisk, stored_images
from backupfs.store.manifest import Catalogue, DiskEntry, digests_path, image_path

log = logging.getLogger(__name__)

ROOT_INODE = 1


@dataclass
class Node:
    inode: int
    name: str
    mtime_ns: int
    children: dict[str, int] = field(default_factory=dict)  # name -> inode, for directories
    image: Image | VirtualDisk | None = None  # for files: a raw image, or a guest's disk

    @property
    def is_dir(self) -> bool:
        return self.image is None

    @property
    def size_bytes(self) -> int:
        return self.image.size_bytes if self.image is not None else 0


class Tree:
    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", 0)}
        self.volumes = VolumeTable()  # served under the control directory (volumes.py)

    def add(
        self, parent: int, name: str, mtime_ns: int, image: Image | VirtualDisk | None = None
    ) -> Node:
        node = Node(len(self.nodes) + 1, name, mtime_ns, image=image)
        self.nodes[node.inode] = node
        parent_node = self.nodes[parent]
        parent_node.children[name] = node.inode
        parent_node.mtime_ns = max(parent_node.mtime_ns, mtime_ns)
        return node

    def lookup(self, parent: int, name: str) -> Node | None:
        inode = self.nodes[parent].children.get(name)
        return None if inode is None else self.nodes[inode]

    def find(self, rel: str) -> Node | None:
        """The node at `rel` ("HOST/SNAPSHOT/DISK.img"), or None."""
        node = self.nodes[ROOT_INODE]
        for name in rel.split("/"):
            found = self.lookup(node.inode, name)
            if found is None:
                return None
            node = found
        return node

    def path_of(self, inode: int) -> str | None:
        """The path of a node ("HOST/SNAPSHOT/DISK.img"), or None: a walk of the tree."""
        todo = [(ROOT_INODE, "")]
        while todo:
            here, path = todo.pop()
            for name, child in self.nodes[here].children.items():
                found = f"{path}/{name}" if path else name
                if child == inode:
                    return found
                todo.append((child, found))
        return None

    def images(self) -> list[Image | VirtualDisk]:
        """What each file serves."""
        return [n.image for n in self.nodes.values() if n.image is not None]

    def stored_images(self) -> list[Image]:
        """The stored files behind the served ones, each once."""
        seen: dict[int, Image] = {}
        for served in self.images():
            seen.update((i.image_id, i) for i in stored_images(served))
        return list(seen.values())


class _Images:
    """One Image per stored file of the catalogue, by store path, shared by every chain."""

    def __init__(self, catalogue: Catalogue, base_url: str, block_size: int) -> None:
        self.base_url, self.block_size = base_url, block_size
        self.entries: dict[str, DiskEntry] = {}
        for snap in catalogue.snapshots:
            for disk in snap.disks:
                self.entries[f"{snap.host}/{snap.name}/{disk.name}"] = disk
        self._made: dict[str, Image] = {}

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
    """One directory per host and snapshot; `block_size` 0 means each disk's store block
    size. A disk whose chain the catalogue breaks is left out (and logged)."""
    tree = Tree()
    images = _Images(catalogue, base_url, block_size)
    hosts: dict[str, int] = {}
    for snap in catalogue.snapshots:
        if snap.host not in hosts:
            hosts[snap.host] = tree.add(ROOT_INODE, snap.host, 0).inode
        snap_node = tree.add(hosts[snap.host], snap.name, snap.time_ns)
        for disk in snap.disks:
            path = f"{snap.host}/{snap.name}/{disk.name}"
            try:
                served = images.served(path, disk, len(tree.nodes) + 1)
            except ManifestError as exc:
                log.error("%s", exc)
                continue
            tree.add(snap_node.inode, disk.served_name, snap.time_ns, served)
    return tree
