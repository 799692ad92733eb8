"""Store metadata over HTTP: the catalogue (whole, or its top level and each host's part), and
each disk's digests made ready on first open."""

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from backupfs.errors import FetchError, ManifestError, StoreError
from backupfs.remote.client import MAX_METADATA_BYTES, StoreClient, redact
from backupfs.remote.digests import ChunkCache, ChunkedDigests, LoadedDigests
from backupfs.store import digestfile, manifest
from backupfs.store.image import BlockDigests, Image, Served, stored_images
from backupfs.units import human

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a server sends instead of a catalogue: an HTML page, an XML error (S3). Static
# servers without a MIME table send JSON as application/octet-stream, so that is no sign.
_NOT_JSON = frozenset({"text/html", "application/xhtml+xml", "text/xml", "application/xml"})


# Parsed in a worker thread above this size: the mount keeps answering meanwhile.
_PARSE_INLINE_BYTES = 256 << 10


@dataclass(frozen=True)
class TopLevel:
    """`backupfs-store.json` as fetched: a whole catalogue (versions 1, 2) or the hosts of a
    split one (3), with what tells a later fetch whether it changed."""

    catalogue: manifest.Catalogue | manifest.HostIndex
    etag: str | None
    sha256: str  # of its bytes: compared when the server gives no ETag


async def _parsed(parse: Callable[[], T], size: int) -> T:
    if size <= _PARSE_INLINE_BYTES:
        return parse()
    return await trio.to_thread.run_sync(parse)


async def load_top_level(store: StoreClient, etag: str | None = None) -> TopLevel | None:
    """The store's catalogue, or only its top level (version 3: its host parts are read by
    load_host); None when `etag` is given and the file has not changed since."""
    path, limit = manifest.CATALOGUE_NAME, manifest.MAX_CATALOGUE_BYTES
    url = redact(store.url(path))
    reply = await store.get_metadata_reply(path, limit, etag)
    if reply is None:
        return None
    data, headers = reply
    if len(data) > limit:
        raise StoreError(f"cannot read {url}: larger than {limit} bytes")
    try:
        parsed = await _parsed(lambda: manifest.parse_store_catalogue(data), len(data))
    except ManifestError as exc:
        kind = headers.get("Content-Type", "").split(";")[0].strip()
        if kind in _NOT_JSON:  # an error page, a directory listing, a login form
            raise ManifestError(
                f"{url}: got {kind}, not a store catalogue (is this the store's URL?)"
            ) from None
        raise ManifestError(f"{url}: {exc}") from None
    return TopLevel(parsed, headers.get("ETag"), hashlib.sha256(data).hexdigest())


def _check_part(data: bytes, host: manifest.HostEntry) -> None:
    what = f"the catalogue of host {host.name}"
    if len(data) > host.catalogue_size:
        raise ManifestError(
            f"{what} is larger than the {host.catalogue_size} bytes the store catalogue says"
        )
    if len(data) != host.catalogue_size:
        raise ManifestError(
            f"{what} is {len(data)} bytes, the store catalogue says {host.catalogue_size}"
        )
    if hashlib.sha256(data).hexdigest() != host.catalogue_sha256:
        raise ManifestError(f"{what} does not match the store catalogue (SHA-256)")


async def load_host(
    store: StoreClient, host: manifest.HostEntry
) -> tuple[manifest.SnapshotEntry, ...]:
    """A host's snapshots, from its part of a version 3 catalogue: checked against the top
    level (size, SHA-256) before it is parsed, and fetched once more when it does not match,
    as a transfer error would be. ManifestError (one line, naming the part's URL and the
    host) when it is refused; StoreError when it cannot be fetched."""
    url = redact(store.url(host.path))
    for attempt in range(2):
        reply = await store.get_metadata_reply(host.path, host.catalogue_size)
        assert reply is not None  # no ETag given: never "not modified"
        data = reply[0]
        try:
            _check_part(data, host)
            break
        except ManifestError as exc:
            store.stats.verify_failures += 1
            if attempt:
                raise ManifestError(f"{url}: {exc}") from None
            log.info("%s: %s; fetching it again", url, exc)
    try:
        return await _parsed(lambda: manifest.parse_host_catalogue(data, host), len(data))
    except ManifestError as exc:
        raise ManifestError(f"{url}: {exc}") from None


@dataclass
class Listing:
    """What `backupfs ls` shows: the snapshots read, and a line for each host refused."""

    catalogue: manifest.Catalogue
    errors: list[str] = field(default_factory=list)


async def load_listing(store: StoreClient, only_host: str | None = None) -> Listing:
    """The whole catalogue (or one host's part of it): a version 3 store's host parts are
    fetched in parallel (as many at once as the client has connections). A host whose part is
    refused, or cannot be read, is left out with its one line in `errors`."""
    top = await load_top_level(store)
    assert top is not None
    if isinstance(top.catalogue, manifest.Catalogue):
        snaps = top.catalogue.snapshots
        if only_host is not None:
            snaps = tuple(s for s in snaps if s.host == only_host)
        return Listing(manifest.Catalogue(snaps))
    index = top.catalogue
    hosts = [h for h in index.hosts if only_host in (None, h.name)]
    errors = [message for name, message in index.refused if only_host in (None, name)]
    found: dict[str, tuple[manifest.SnapshotEntry, ...]] = {}
    failed: dict[str, str] = {}
    limiter = trio.CapacityLimiter(store.config.connections)

    async def fetch(host: manifest.HostEntry) -> None:
        async with limiter:
            try:
                found[host.name] = await load_host(store, host)
            except StoreError as exc:
                failed[host.name] = str(exc)

    async with trio.open_nursery() as nursery:
        for host in hosts:
            nursery.start_soon(fetch, host)
    snaps = tuple(s for h in hosts if h.name in found for s in found[h.name])
    return Listing(manifest.Catalogue(snaps), errors + [failed[h.name] for h in hosts
                                                       if h.name in failed])  # fmt: skip


async def load_catalogue(store: StoreClient) -> manifest.Catalogue:
    """The store's whole catalogue, every host part of it read (version 3); ManifestError or
    StoreError when any of it is refused."""
    listing = await load_listing(store)
    if listing.errors:
        raise ManifestError(listing.errors[0])
    return listing.catalogue


def _checked(data: bytes, expected_sha256: str, expected_size: int, what: str) -> bytes:
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ManifestError(f"{what} does not match the catalogue")
    if len(data) != expected_size:
        raise ManifestError(f"{what} has the wrong size")
    return data


class DigestLoader:
    """Makes each image's block digests ready before its first read (remote/digests.py):
    the whole digest file (store format 1) or its chunk index (2), fetched once and checked
    against the catalogue; concurrent openers of one image wait for the same fetch."""

    def __init__(self, store: StoreClient, cache_bytes: int) -> None:
        self.store = store
        self.chunks = ChunkCache(store, cache_bytes, store.stats)
        self._locks: dict[int, trio.Lock] = {}

    async def ensure(self, image: Image) -> None:
        if image.digests is not None or image.digests_path is None:
            return
        lock = self._locks.setdefault(image.image_id, trio.Lock())
        async with lock:
            if image.digests is None:
                image.digests = await self._load(image, image.digests_path)

    async def ensure_served(self, served: Served) -> None:
        """The digests of every stored file a served disk reads (a chain's: all of them)."""
        for image in stored_images(served):
            await self.ensure(image)

    async def _load(self, image: Image, path: str) -> BlockDigests:
        digest_size = digestfile.digest_file_size(image.size_bytes, image.digest_block_size)
        url = redact(self.store.url(path))
        if image.digest_index_sha256 is not None:
            size = digestfile.index_size(digest_size)
            if size > digestfile.MAX_INDEX_BYTES:
                raise ManifestError(f"{url}: {image.size_bytes} bytes is too large an image")
            index_path = path + digestfile.INDEX_SUFFIX
            index = await self._fetch_verified(index_path, image.digest_index_sha256, size)
            self.store.stats.digest_index_bytes += len(index)
            return ChunkedDigests(image.image_id, path, index, digest_size, self.chunks)
        assert image.digests_sha256 is not None
        if digest_size > MAX_METADATA_BYTES:
            raise ManifestError(
                f"{url}: the digest file is {human(digest_size)}, more than store format 1 "
                "fetches whole; run `backupfs index` on the store to rewrite it in format 2"
            )
        return LoadedDigests(await self._fetch_verified(path, image.digests_sha256, digest_size))

    async def _fetch_verified(self, path: str, sha256: str, size: int) -> bytes:
        """A whole metadata file that must match `sha256`, fetched again (like a data block)
        when a transfer does not: a flipped byte on the way is not a broken store."""
        url = redact(self.store.url(path))

        async def attempt() -> bytes:
            data, _ = await self.store.get_metadata_typed(path, size)
            try:
                return await trio.to_thread.run_sync(_checked, data, sha256, size, url)
            except ManifestError as exc:
                self.store.stats.verify_failures += 1
                raise FetchError(str(exc), transient=True) from None

        try:
            return await self.store.with_retries(attempt, url)
        except FetchError as exc:
            raise ManifestError(str(exc)) from None
