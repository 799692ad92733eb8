"""The mounted tree `<host>/<snapshot>/<disk>.img` as plain data; it knows nothing of FUSE."""

from dataclasses import dataclass, field
from urllib.parse import quote

from backupfs.store.image import Image
from backupfs.store.manifest import Catalogue, digests_path, image_path

ROOT_INODE = 1


@dataclass
class Node:
    inode: int
    name: str
    mtime_ns: int
    children: dict[str, int] = field(default_factory=dict)  # name -> inode, for directories
    image: Image | None = None  # for files

    @property
    def is_dir(self) -> bool:
        return self.image is None

    @property
    def size_bytes(self) -> int:
        return self.image.size_bytes if self.image is not None else 0


class Tree:
    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", 0)}

    def add(self, parent: int, name: str, mtime_ns: int, image: Image | None = None) -> Node:
        node = Node(len(self.nodes) + 1, name, mtime_ns, image=image)
        self.nodes[node.inode] = node
        parent_node = self.nodes[parent]
        parent_node.children[name] = node.inode
        parent_node.mtime_ns = max(parent_node.mtime_ns, mtime_ns)
        return node

    def lookup(self, parent: int, name: str) -> Node | None:
        inode = self.nodes[parent].children.get(name)
        return None if inode is None else self.nodes[inode]

    def images(self) -> list[Image]:
        return [n.image for n in self.nodes.values() if n.image is not None]


def build_tree(catalogue: Catalogue, base_url: str, block_size: int) -> Tree:
    """One directory per host and snapshot; `block_size` 0 means each disk's store block size."""
    tree = Tree()
    hosts: dict[str, int] = {}
    for snap in catalogue.snapshots:
        if snap.host not in hosts:
            hosts[snap.host] = tree.add(ROOT_INODE, snap.host, 0).inode
        snap_node = tree.add(hosts[snap.host], snap.name, snap.time_ns)
        for disk in snap.disks:
            image = Image(
                image_id=len(tree.nodes) + 1,
                url=base_url + quote(image_path(snap.host, snap.name, disk.name)),
                size_bytes=disk.size_bytes,
                block_size=block_size or disk.block_size,
                digest_block_size=disk.block_size,
                digests_path=digests_path(snap.host, snap.name, disk.name),
                digests_sha256=disk.digests_sha256,
                digest_index_sha256=disk.digest_index_sha256,
            )
            tree.add(snap_node.inode, disk.name, snap.time_ns, image)
    return tree
