"""Store metadata over HTTP: the catalogue, and each disk's digests made ready on first open."""

import hashlib
import logging

import trio

from backupfs.errors import FetchError, ManifestError
from backupfs.remote.client import MAX_METADATA_BYTES, StoreClient, redact
from backupfs.remote.digests import ChunkCache, ChunkedDigests, LoadedDigests
from backupfs.store import digestfile, manifest
from backupfs.store.image import BlockDigests, Image, Served, stored_images
from backupfs.units import human

log = logging.getLogger(__name__)
# What a server sends instead of a catalogue: an HTML page, an XML error (S3). Static
# servers without a MIME table send JSON as application/octet-stream, so that is no sign.
_NOT_JSON = frozenset({"text/html", "application/xhtml+xml", "text/xml", "application/xml"})


async def load_catalogue(store: StoreClient) -> manifest.Catalogue:
    data, content_type = await store.get_metadata_typed(
        manifest.CATALOGUE_NAME, manifest.MAX_CATALOGUE_BYTES
    )
    try:
        return manifest.parse_catalogue(data)
    except ManifestError as exc:
        url = redact(store.url(manifest.CATALOGUE_NAME))
        kind = content_type.split(";")[0].strip()
        if kind in _NOT_JSON:  # an error page, a directory listing, a login form
            raise ManifestError(
                f"{url}: got {kind}, not a store catalogue (is this the store's URL?)"
            ) from None
        raise ManifestError(f"{url}: {exc}") from None


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
