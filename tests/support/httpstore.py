"""An in-process HTTP store for unit tests (httpx.MockTransport): files by path, strong
ETags, 304 for a matching If-None-Match, 206 for a mount's Range probe, and a log of every
request; and the catalogues and FUSE calls the tests of a split catalogue use."""

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pyfuse3
import pytest

from backupfs.mount.control import StatsSources
from backupfs.mount.fuse_ops import BackupFsOps
from backupfs.mount.tree import Tree
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.readahead import ReadaheadConfig
from backupfs.remote.client import ClientConfig, StoreClient
from backupfs.stats import Stats
from backupfs.store import manifest
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry

BASE = "https://store.invalid/s/"


class _Body(httpx.AsyncByteStream):
    """A body httpx streams (what it makes of `content=` bytes is read already)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for at in range(0, len(self.data), 64 << 10):
            yield self.data[at : at + (64 << 10)]


class FakeStore:
    """Files by path; strong ETags (their SHA-256), 304 for a matching If-None-Match, 206 for
    the Range probe. `log` holds (path, status) of every request; `sent` the body bytes."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.log: list[tuple[str, int]] = []
        self.sent = 0
        self.streamed: dict[str, Callable[[], AsyncIterator[bytes]]] = {}

    def publish(self, catalogue: Catalogue) -> None:
        self.files.update(manifest.catalogue_files(catalogue))

    def paths(self) -> list[str]:
        return [p for p, _ in self.log]

    def clear(self) -> None:
        self.log.clear()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/s/")
        if path in self.streamed:
            self.log.append((path, 200))
            return httpx.Response(200, content=self.streamed[path]())
        data = self.files.get(path)
        if data is None:
            self.log.append((path, 404))
            return httpx.Response(404)
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        if request.headers.get("if-none-match") == etag:
            self.log.append((path, 304))
            return httpx.Response(304, headers={"ETag": etag})
        if request.headers.get("range") == "bytes=0-0":
            self.log.append((path, 206))
            headers = {"Content-Range": f"bytes 0-0/{len(data)}", "ETag": etag}
            return httpx.Response(206, stream=_Body(data[:1]), headers=headers)
        self.log.append((path, 200))
        self.sent += len(data)
        return httpx.Response(200, stream=_Body(data), headers={"ETag": etag})


def images_of(catalogue: Catalogue) -> dict[str, bytes]:
    return {
        manifest.image_path(s.host, s.name, d.name): b"\0" * d.size_bytes
        for s in catalogue.snapshots
        for d in s.disks
    }


def fake_store(catalogue: Catalogue) -> FakeStore:
    fake = FakeStore(images_of(catalogue))
    fake.publish(catalogue)
    return fake


def client_of(
    fake: FakeStore, client: httpx.AsyncClient, stats: Stats | None = None
) -> StoreClient:
    return StoreClient([client], BASE, ClientConfig(4, 10.0, 1), stats or Stats())


def http_of(fake: FakeStore) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))


HEX = "ab" * 32
CTX: Any = pyfuse3.RequestContext()
T0 = 1_795_143_600_000_000_000


def disk(name: str = "sda.img", size: int = 10_000, block_size: int = 4096, **kw: Any) -> DiskEntry:
    return DiskEntry(name, size, 0, block_size, digest_index_sha256=HEX, **kw)


def snapshot_of(host: str, name: str, *disks: DiskEntry, t: int = 0) -> SnapshotEntry:
    return SnapshotEntry(host, name, T0 + t, disks or (disk(),))


def catalogue_of(hosts: int = 3, snaps: int = 2) -> Catalogue:
    return Catalogue(
        tuple(snapshot_of(f"h{h}", f"s{s}", t=s) for h in range(hosts) for s in range(snaps))
    )


def ops_of(tree: Tree) -> BackupFsOps:
    stats = Stats()
    sources = StatsSources(BASE, stats, BlockCache(1 << 20, stats), 1 << 20, 1 << 20, 0.0)
    anything: Any = None
    return BackupFsOps(tree, anything, anything, ReadaheadConfig(), False, sources)


async def names_in(ops: BackupFsOps, inode: int) -> list[str]:
    await ops.readdir(inode, 0, None)  # type: ignore[arg-type]  # fills and refreshes only
    return sorted(name for _, name in ops.view.entries(inode))


async def errno_of(call: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno


def quiet_readdir(monkeypatch: pytest.MonkeyPatch) -> None:
    """readdir's replies go to the kernel: here, nowhere (tests check the view's entries)."""
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda *args: True)


def tamper(fake: FakeStore, host: str, data: bytes, fix_top: bool) -> None:
    """Replace a host's part; with `fix_top`, make the top level name it (size, SHA-256)."""
    path = manifest.host_catalogue_path(host)
    fake.files[path] = data
    if fix_top:
        doc = json.loads(fake.files[manifest.CATALOGUE_NAME])
        entry = next(h for h in doc["hosts"] if h["name"] == host)
        entry.update(catalogue_size=len(data), catalogue_sha256=hashlib.sha256(data).hexdigest())
        fake.files[manifest.CATALOGUE_NAME] = json.dumps(doc).encode()
