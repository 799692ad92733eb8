"""Opening a store: catalogue, tree, Range probe, and lazy loading of per-disk digests."""

import hashlib
import logging

import trio

from backupfs.errors import ManifestError, UserError
from backupfs.mount.tree import Tree, build_tree
from backupfs.ranges import block_count
from backupfs.remote.client import Image, StoreClient
from backupfs.store import manifest

log = logging.getLogger(__name__)


async def load_catalogue(store: StoreClient) -> manifest.Catalogue:
    return manifest.parse_catalogue(await store.get_metadata(manifest.CATALOGUE_NAME))


async def open_store(store: StoreClient, block_size: int) -> Tree:
    catalogue = await load_catalogue(store)
    for snap in catalogue.snapshots:
        for disk in snap.disks:
            if block_size and block_size % disk.block_size:
                raise UserError(
                    f"block_size={block_size} is not a multiple of the store's block size "
                    f"({disk.block_size}) for {snap.host}/{snap.name}/{disk.name}"
                )
    tree = build_tree(catalogue, store.base_url, block_size)
    images = tree.images()
    if images:
        await store.probe_range(images[0])
    return tree


def _parse_digests(data: bytes, image: Image) -> list[bytes]:
    if hashlib.sha256(data).hexdigest() != image.digests_sha256:
        raise ManifestError(f"digest file of {image.url} does not match the catalogue")
    if len(data) != block_count(image.digest_block_size, image.size_bytes) * manifest.DIGEST_SIZE:
        raise ManifestError(f"digest file of {image.url} has the wrong size")
    size = manifest.DIGEST_SIZE
    return [data[i : i + size] for i in range(0, len(data), size)]


async def ensure_digests(store: StoreClient, image: Image) -> None:
    """Fetch and check the image's block digests once, before its first read."""
    if image.digests is not None or image.digests_path is None:
        return
    async with image.load_lock:
        if image.digests is None:
            data = await store.get_metadata(image.digests_path)
            image.digests = await trio.to_thread.run_sync(_parse_digests, data, image)
