"""Opening a store for a mount: the catalogue, the tree built from it, one Range probe."""

from backupfs.errors import UsageError
from backupfs.mount.tree import Tree, build_tree
from backupfs.remote.client import StoreClient
from backupfs.remote.metadata import load_catalogue


async def open_store(store: StoreClient, block_size: int) -> Tree:
    catalogue = await load_catalogue(store)
    for snap in catalogue.snapshots:
        for disk in snap.disks:
            if block_size and block_size % disk.block_size:
                raise UsageError(
                    f"block_size={block_size} is not a multiple of the store's block size "
                    f"({disk.block_size}) for {snap.host}/{snap.name}/{disk.name}"
                )
    tree = build_tree(catalogue, store.base_url, block_size)
    images = tree.stored_images()
    if images:
        await store.probe_range(images[0])
    return tree
