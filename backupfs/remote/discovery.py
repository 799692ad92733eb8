"""A store that was never indexed (`-o no_index`), found from its listing.

`HOST/SNAPSHOT/FILE` is discovered from a bucket listing (s3://, ListObjectsV2: sizes and
ETags come with it) or from a web server's directory listing (nginx or Apache autoindex:
three levels of pages, then one `Range: bytes=0-0` GET per file for its size and ETag).
Every file is served as it is stored (raw), and its blocks cannot be verified: there are
no digests. What is checked instead: every reply is a 206 with the Content-Range asked
for, the object's length, and the ETag (or Last-Modified) pinned at discovery, so a file
replaced under the mount fails its reads (EIO) instead of mixing two versions.

Runs in the command's process, before a mount's daemon starts; listings are untrusted and
bounded (pages, entries, names checked as catalogue names are).
"""

import concurrent.futures
import contextlib
import email.utils
import logging
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import quote, unquote, urljoin, urlsplit

from backupfs.errors import ManifestError, StoreError
from backupfs.remote import checks
from backupfs.remote.bucket import Bucket
from backupfs.remote.client import redact
from backupfs.store import manifest
from backupfs.store.image import Image
from backupfs.store.indexer import snapshot_time_ns
from backupfs.store.manifest import Catalogue, DiskEntry, SnapshotEntry

log = logging.getLogger(__name__)
MAX_PAGE_BYTES = 16 << 20
MAX_ENTRIES = 100_000  # per directory page
BLOCK_SIZE = 64 << 10  # the fetch unit's granularity (there are no digests to match)
UNVERIFIED = (
    "not indexed: blocks are not digest-verified (only lengths, Content-Range and the "
    "pinned ETag are checked); `backupfs index` the store to verify every block"
)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href is not None and len(self.hrefs) <= MAX_ENTRIES:
                self.hrefs.append(href)


def parse_autoindex(page: bytes, page_url: str) -> tuple[list[str], list[str]]:
    """(subdirectories, files) a directory listing links to, by name: only links to the
    page's own children count (not parents, sort links, other hosts or hidden names)."""
    if len(page) > MAX_PAGE_BYTES:
        raise StoreError(f"{redact(page_url)}: a listing page over {MAX_PAGE_BYTES >> 20} MiB")
    parser = _Links()
    parser.feed(page.decode("utf-8", errors="replace"))
    if len(parser.hrefs) > MAX_ENTRIES:
        raise StoreError(f"{redact(page_url)}: more than {MAX_ENTRIES} entries in a listing")
    base = urlsplit(page_url)
    dirs: list[str] = []
    files: list[str] = []
    for href in parser.hrefs:
        target = urlsplit(urljoin(page_url, href))
        if (target.scheme, target.netloc) != (base.scheme, base.netloc) or target.query:
            continue
        if not target.path.startswith(base.path) or target.path == base.path:
            continue
        rest = unquote(target.path[len(base.path) :])
        is_dir = rest.endswith("/")
        name = rest.removesuffix("/")
        try:
            manifest.check_name(name, "listed")
        except ManifestError:
            continue
        (dirs if is_dir else files).append(name)
    return sorted(set(dirs)), sorted(set(files))


class Discovery:
    def __init__(self, bucket: Bucket, connections: int, say: Callable[[str], None]) -> None:
        self.bucket, self.say = bucket, say
        self.pool = concurrent.futures.ThreadPoolExecutor(connections)
        self.validators: dict[str, str] = {}  # store path -> pinned validator

    def _page(self, path: str) -> tuple[list[str], list[str]]:
        url = self.bucket.url(path)
        data = self.bucket.get(path, MAX_PAGE_BYTES)
        if data is None:
            raise StoreError(f"{redact(url)}: no such directory (404)")
        return parse_autoindex(data, url)

    def _probe(self, path: str) -> tuple[int, int, str | None]:
        """Size, mtime and validator of one file, by a one-byte ranged GET."""
        resp = self.bucket.first_byte(path)
        _, _, total = checks.parse_content_range(resp.headers.get("content-range", ""))
        if total is None:
            raise StoreError(f"{redact(self.bucket.url(path))}: no length in Content-Range")
        modified = resp.headers.get("last-modified")
        mtime_ns = 0
        if modified:
            with contextlib.suppress(TypeError, ValueError):
                mtime_ns = int(email.utils.parsedate_to_datetime(modified).timestamp()) * 10**9
        return total, mtime_ns, checks.validator_of(resp.headers)

    def from_autoindex(self) -> Catalogue:
        hosts, _ = self._page("")
        snapshot_paths = []
        for host, (snaps, _) in zip(hosts, self.pool.map(lambda h: self._page(h + "/"), hosts),
                                    strict=True):  # fmt: skip
            snapshot_paths += [(host, s) for s in snaps]
        pages = self.pool.map(lambda hs: self._page(f"{hs[0]}/{hs[1]}/"), snapshot_paths)
        files = [(h, s, f) for (h, s), (_, names) in zip(snapshot_paths, pages, strict=True)
                 for f in names]  # fmt: skip
        probed = self.pool.map(lambda hsf: self._probe("/".join(hsf)), files)
        found: dict[tuple[str, str], list[DiskEntry]] = {}
        for (host, snap, name), (size, mtime_ns, validator) in zip(files, probed, strict=True):
            found.setdefault((host, snap), []).append(DiskEntry(name, size, mtime_ns, BLOCK_SIZE))
            if validator is not None:
                self.validators[f"{host}/{snap}/{name}"] = validator
        return _catalogue(found)

    def from_bucket(self) -> Catalogue:
        found: dict[tuple[str, str], list[DiskEntry]] = {}
        for obj in self.bucket.list():
            parts = obj.key.split("/")
            if len(parts) != 3 or obj.key == manifest.CATALOGUE_NAME:
                continue
            try:
                for part, what in zip(parts, ("host", "snapshot", "disk"), strict=True):
                    manifest.check_name(part, what)
            except ManifestError:
                continue
            host, snap, name = parts
            found.setdefault((host, snap), []).append(
                DiskEntry(name, obj.size, obj.mtime_ns, BLOCK_SIZE)
            )
            if obj.etag and not obj.etag.startswith("W/"):
                self.validators[obj.key] = f"etag:{obj.etag}"
        return _catalogue(found)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _catalogue(found: dict[tuple[str, str], list[DiskEntry]]) -> Catalogue:
    snapshots = []
    for (host, snap), disks in sorted(found.items()):
        time_ns = snapshot_time_ns(snap, max(d.mtime_ns for d in disks))
        snapshots.append(SnapshotEntry(host, snap, time_ns, tuple(disks)))
    return Catalogue(tuple(snapshots))


def discover(bucket: Bucket, connections: int, say: Callable[[str], None]) -> "Discovered":
    """The store's catalogue as its listing shows it, and each file's pinned validator."""
    discovery = Discovery(bucket, connections, say)
    try:
        if bucket.target.location is not None:
            catalogue = discovery.from_bucket()
        else:
            catalogue = discovery.from_autoindex()
    finally:
        discovery.close()
        bucket.close()
    if not catalogue.snapshots:
        raise StoreError(f"{bucket.target.shown}: no HOST/SNAPSHOT/FILE found in its listing")
    return Discovered(catalogue, discovery.validators)


@dataclass(frozen=True)
class Discovered:
    """What a listing found, handed from the command to the mount's daemon."""

    catalogue: Catalogue
    validators: dict[str, str]  # store path "host/snapshot/file" -> pinned ETag


def unverified(tree_images: list[Image], base_url: str, found: Discovered) -> None:
    """Make the images of an unindexed mount unverified (no digests to load) and pin
    each to the validator its listing gave."""
    by_url = {base_url + quote(path): v for path, v in found.validators.items()}
    for image in tree_images:
        image.digests_path = None
        image.digests_sha256 = image.digest_index_sha256 = None
        image.validator = by_url.get(image.url, image.validator)
