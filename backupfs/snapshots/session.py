"""A store opened in-process for `find`, `log`, `diff` and `cat`: the mount's read path
without FUSE. Filesystem readers are synchronous and run in worker threads; their reads
come back to trio's thread through `trio.from_thread`, so every byte is a verified block
of the same BlockReader (and cache) a mount uses."""

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import trio

from backupfs.errors import UserError
from backupfs.mount.tree import Tree, build_tree
from backupfs.options import MountOptions
from backupfs.readpath.blocks import BlockReader, ReaderConfig
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.vdisk import DiskReader
from backupfs.remote.client import ClientConfig, StoreClient, enlarge_socket_reads, make_clients
from backupfs.remote.metadata import DigestLoader, load_listing
from backupfs.remote.target import StoreTarget
from backupfs.stats import Stats
from backupfs.store.image import Image, Served, VirtualDisk
from backupfs.store.manifest import SnapshotEntry

Read = Callable[[int, int], bytes]


@dataclass
class Session:
    store: StoreClient
    tree: Tree
    snapshots: list[SnapshotEntry]  # of the hosts asked for, oldest first
    digests: DigestLoader
    disks: DiskReader
    stats: Stats
    token: trio.lowlevel.TrioToken

    async def open_disk(self, path: str) -> Served:
        """The served disk at "host/snapshot/disk.img", its digests and tables ready."""
        node = self.tree.find(path)
        if node is None or node.image is None:
            raise UserError(f"no disk {path} in the store")
        served = node.image
        await self.digests.ensure_served(served)
        if isinstance(served, VirtualDisk):
            await self.disks.open(served)
        return served

    def reader(self, served: Served) -> Read:
        """A synchronous `read(offset, length)` of the disk for a worker thread."""

        def read(offset: int, length: int) -> bytes:
            size = served.size_bytes
            if offset < 0 or length < 0 or offset >= size:
                return b""
            length = min(length, size - offset)
            return trio.from_thread.run(self.disks.read, served, offset, length,
                                        trio_token=self.token)  # fmt: skip

        return read


def stored_image(served: Served) -> Image | None:
    """The one stored file behind a raw disk (whose digests describe its bytes), or None."""
    return served if isinstance(served, Image) else None


@contextlib.asynccontextmanager
async def open_session(
    target: StoreTarget, opts: MountOptions, host: str | None
) -> AsyncIterator[Session]:
    stats = Stats()
    config = ClientConfig.from_options(opts, s3=target.creds.aws is not None)
    enlarge_socket_reads()
    async with make_clients(config, target.creds) as clients, trio.open_nursery() as nursery:
        store = StoreClient(clients, target.url, config, stats)
        listing = await load_listing(store, host)
        for error in listing.errors:
            raise UserError(error)
        catalogue = listing.catalogue
        snapshots = sorted((s for s in catalogue.snapshots if host in (None, s.host)),
                           key=lambda s: (s.host, s.time_ns, s.name))  # fmt: skip
        tree = build_tree(catalogue, target.url, opts.block_size)
        cache = BlockCache(opts.block_cache_bytes, stats)
        reader = BlockReader(store, cache, nursery, ReaderConfig.from_options(opts), stats)
        digests = DigestLoader(store, opts.digest_cache_bytes)
        session = Session(store, tree, snapshots, digests, DiskReader(reader), stats,
                          trio.lowlevel.current_trio_token())  # fmt: skip
        try:
            yield session
        finally:
            nursery.cancel_scope.cancel()
