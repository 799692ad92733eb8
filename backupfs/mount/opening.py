"""Opening a store for a mount: the catalogue (a split one's top level only), the tree built
from it, one Range probe."""

from urllib.parse import quote

from backupfs.errors import UsageError
from backupfs.mount.catalogue import MountCatalogue
from backupfs.mount.tree import Tree, build_tree
from backupfs.remote.client import StoreClient
from backupfs.remote.metadata import load_top_level
from backupfs.store.image import Image
from backupfs.store.manifest import Catalogue, HostIndex, image_path

DEFAULT_REFRESH_S = 60.0  # MountOptions.catalogue_refresh's default


def _check_block_size(block_size: int, disk_block_size: int, where: str) -> None:
    if block_size and block_size % disk_block_size:
        raise UsageError(
            f"block_size={block_size} is not a multiple of the store's block size "
            f"({disk_block_size}) for {where}"
        )


def _check_block_sizes(catalogue: Catalogue | HostIndex, block_size: int) -> None:
    if isinstance(catalogue, HostIndex):
        for host in catalogue.hosts:
            for size in host.block_sizes:
                _check_block_size(block_size, size, f"host {host.name}")
        return
    for snap in catalogue.snapshots:
        for disk in snap.disks:
            _check_block_size(block_size, disk.block_size, f"{snap.host}/{snap.name}/{disk.name}")


def _probe_image(tree: Tree, catalogue: Catalogue | HostIndex) -> Image | None:
    """The stored file the Range probe reads: a split catalogue names one in its top level
    (no host part is fetched to mount), a whole one's first."""
    if isinstance(catalogue, HostIndex):
        if catalogue.probe is None:
            return None
        host, snap, name = catalogue.probe.path.split("/")
        return Image(0, tree.table.base_url + quote(image_path(host, snap, name)),
                     catalogue.probe.size_bytes, 1, 1)  # fmt: skip
    images = tree.stored_images()
    return images[0] if images else None


async def open_store(
    store: StoreClient,
    block_size: int,
    catalogue: Catalogue | None = None,
    refresh_s: float = DEFAULT_REFRESH_S,
) -> Tree:
    """The tree a mount serves. With `catalogue` (a whole one the caller has, such as one
    made from a listing), nothing is fetched: the tree is built from it, whole, and never
    refreshed. Otherwise the store's catalogue is fetched: a whole one (versions 1, 2) is
    built at once, a split one (3) with each host's directory, its snapshots fetched on
    first use (mount/catalogue.py); either is read again at most every `refresh_s` seconds,
    when a directory is listed, for new snapshots."""
    if catalogue is not None:
        _check_block_sizes(catalogue, block_size)
        tree = build_tree(catalogue, store.base_url, block_size)
        probe = _probe_image(tree, catalogue)
    else:
        top = await load_top_level(store)
        assert top is not None  # asked with no ETag
        _check_block_sizes(top.catalogue, block_size)
        tree = Tree(store.base_url, block_size)
        tree.loader = MountCatalogue(store, tree, top, block_size, refresh_s)
        probe = _probe_image(tree, top.catalogue)
    if probe is not None:
        await store.probe_range(probe)
    return tree
