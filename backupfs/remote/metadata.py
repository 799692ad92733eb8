"""Store metadata over HTTP: the catalogue, and per-disk digests loaded once on first open."""

import hashlib
import logging

import trio

from backupfs.errors import FetchError, ManifestError
from backupfs.ranges import block_count
from backupfs.remote.client import StoreClient, redact
from backupfs.store import manifest
from backupfs.store.image import Image

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


def _parse_digests(data: bytes, image: Image) -> list[bytes]:
    if hashlib.sha256(data).hexdigest() != image.digests_sha256:
        raise ManifestError(f"digest file of {image.url} does not match the catalogue")
    if len(data) != block_count(image.digest_block_size, image.size_bytes) * manifest.DIGEST_SIZE:
        raise ManifestError(f"digest file of {image.url} has the wrong size")
    size = manifest.DIGEST_SIZE
    return [data[i : i + size] for i in range(0, len(data), size)]


class DigestLoader:
    """Fetches and checks each image's block digests once, before its first read; concurrent
    openers of one image wait for the same fetch (one trio.Lock per image)."""

    def __init__(self, store: StoreClient) -> None:
        self.store = store
        self._locks: dict[int, trio.Lock] = {}

    async def ensure(self, image: Image) -> None:
        if image.digests is not None or image.digests_path is None:
            return
        lock = self._locks.setdefault(image.image_id, trio.Lock())
        async with lock:
            if image.digests is None:
                image.digests = await self._fetch_verified(image, image.digests_path)

    async def _fetch_verified(self, image: Image, path: str) -> list[bytes]:
        """The digest file, fetched again (like a data block) when a transfer does not
        match the catalogue's SHA-256: a flipped byte on the way is not a broken store."""

        async def attempt() -> list[bytes]:
            data = await self.store.get_metadata(path)
            try:
                return await trio.to_thread.run_sync(_parse_digests, data, image)
            except ManifestError as exc:
                self.store.stats.verify_failures += 1
                raise FetchError(str(exc), transient=True) from None

        try:
            return await self.store.with_retries(attempt, redact(self.store.url(path)))
        except FetchError as exc:
            raise ManifestError(str(exc)) from None
