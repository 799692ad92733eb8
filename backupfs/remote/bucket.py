"""A store's top as `backupfs index` and unindexed mounts use it before a mount: a bucket
prefix (list, ranged GETs pinned to an ETag, PUTs) or a web server's directory.

Synchronous (httpx.Client, one per worker thread: hashing runs in a thread pool), with
the same signatures, error lines and retries as the mount's client.
"""

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote

import httpx

from backupfs.errors import FetchError, StoreError
from backupfs.remote import checks, s3errors
from backupfs.remote.client import backoff_s, redact
from backupfs.remote.failures import http_error
from backupfs.remote.listing import StoredObject, parse_list_page
from backupfs.remote.target import StoreTarget

log = logging.getLogger(__name__)
MAX_LISTED_OBJECTS = 10_000_000


class Bucket:
    def __init__(self, target: StoreTarget, timeout_s: float = 30.0, retries: int = 4) -> None:
        self.target, self.timeout_s, self.retries = target, timeout_s, retries
        self.prefix = target.location.prefix if target.location is not None else ""
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()

    def _client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            creds = self.target.creds
            client = httpx.Client(
                auth=creds.auth(),
                verify=creds.ssl_context,
                headers={"Accept-Encoding": "identity", "User-Agent": "backupfs"},
                timeout=httpx.Timeout(self.timeout_s),
                follow_redirects=False,
            )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _request(
        self,
        method: str,
        url: str,
        expect: tuple[int, ...],
        check: Callable[[httpx.Response], None] | None = None,
        **kwargs: object,
    ) -> httpx.Response:
        """One request with retries of transient failures; the reply must have a status
        in `expect` and pass `check` (a FetchError). S3 error replies become their one line
        (s3errors.py)."""
        for attempt in range(self.retries + 1):
            try:
                try:
                    resp = self._client().request(method, url, **kwargs)  # type: ignore[arg-type]
                except httpx.HTTPError as exc:
                    raise http_error(exc, url) from None
                if resp.status_code in expect:
                    if check is not None:
                        check(resp)
                    return resp
                error = s3errors.s3_error(resp.status_code, resp.content[: 1 << 16])
                if error is None:
                    transient = resp.status_code >= 500 or resp.status_code == 429
                    error = FetchError(f"HTTP {resp.status_code}", transient=transient,
                                       status=resp.status_code)  # fmt: skip
                raise error
            except FetchError as exc:
                if not exc.transient or attempt == self.retries:
                    raise StoreError(f"{method} {redact(url)}: {exc}") from None
                delay = backoff_s(attempt)
                log.info("%s %s: %s; retrying in %.2fs", method, redact(url), exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def url(self, key: str) -> str:
        """The URL of `key`, relative to the prefix."""
        return self.target.url + quote(key)

    def list(self) -> Iterator[StoredObject]:
        """Every object below the prefix (ListObjectsV2, page by page)."""
        assert self.target.bucket_url is not None
        token: str | None = None
        listed = 0
        while True:
            params = {"list-type": "2", "prefix": self.prefix}
            if token is not None:
                params["continuation-token"] = token
            resp = self._request("GET", self.target.bucket_url, (200,), params=params)
            objects, token = parse_list_page(resp.content, self.prefix, self.target.shown)
            listed += len(objects)
            if listed > MAX_LISTED_OBJECTS:
                raise StoreError(f"{self.target.shown}: more than {MAX_LISTED_OBJECTS} objects")
            yield from objects
            if token is None:
                return

    def get_range(self, key: str, start: int, end: int, etag: str, total: int) -> bytes:
        """Bytes `[start, end)` of `key`, which must still be the object listed as `etag`."""
        headers = {"Range": f"bytes={start}-{end - 1}", "If-Match": etag}

        def check(resp: httpx.Response) -> None:
            checks.check_range_headers(resp.headers, start, end, total, None)
            if len(resp.content) != end - start:
                raise FetchError(f"short body: {len(resp.content)} of {end - start}",
                                 transient=True)  # fmt: skip

        return self._request("GET", self.url(key), (206,), check, headers=headers).content

    def first_byte(self, key: str) -> httpx.Response:
        """The reply to `Range: bytes=0-0` (a 206: its Content-Range gives the length)."""
        url = self.url(key)
        resp = self._request("GET", url, (206, 200), headers={"Range": "bytes=0-0"})
        if resp.status_code == 200:
            raise StoreError(f"{redact(url)}: the server ignores Range requests (answered 200)")
        return resp

    def get(self, key: str, limit: int) -> bytes | None:
        """A whole small object, None when there is none."""
        resp = self._request("GET", self.url(key), (200, 404))
        if resp.status_code == 404:
            return None
        if len(resp.content) > limit:
            raise StoreError(f"{redact(self.url(key))}: larger than {limit} bytes")
        return resp.content

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        headers = {
            "x-amz-content-sha256": hashlib.sha256(data).hexdigest(),
            "Content-Type": content_type,
        }
        self._request("PUT", self.url(key), (200,), content=data, headers=headers)
