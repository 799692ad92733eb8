"""HTTP access to a store: metadata GETs and verified ranged GETs, with retries.

One `httpx.AsyncClient` per daemon; a `trio.CapacityLimiter` in front of it so that
waiting for a connection happens here, in FIFO order, and never inside httpx.
"""

import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import httpcore
import httpx
import trio

from backupfs.errors import FetchError, StoreError, UserError
from backupfs.options import MountOptions
from backupfs.remote import checks
from backupfs.remote.credentials import Credentials
from backupfs.stats import Stats

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_METADATA_BYTES = 1 << 30
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 4.0


def check_base_url(url: str) -> str:
    """The store URL with a trailing slash; credentials in it are refused (ps would show them)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"not an http(s) URL: {redact(url)}")
    if parts.username or parts.password:
        raise UserError("credentials in the URL are refused; use -o token_file= or -o netrc=")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# httpcore receives at most 64 KiB per socket read; bodies here are megabytes, and larger
# reads halve the CPU spent per byte (measured: 250 -> 470+ MB/s on loopback).
_SOCKET_READ_BYTES = 1 << 20


def make_client(opts: MountOptions, creds: Credentials) -> httpx.AsyncClient:
    http11 = httpcore.AsyncHTTP11Connection
    if getattr(http11, "READ_NUM_BYTES", 0) < _SOCKET_READ_BYTES:
        http11.READ_NUM_BYTES = _SOCKET_READ_BYTES
    headers = {"Accept-Encoding": "identity", "User-Agent": "backupfs", **creds.headers()}
    return httpx.AsyncClient(
        headers=headers,
        verify=creds.ssl_context,
        limits=httpx.Limits(
            max_connections=opts.connections, max_keepalive_connections=opts.connections
        ),
        timeout=httpx.Timeout(opts.timeout),
        follow_redirects=False,
    )


@dataclass
class Image:
    """One remote disk image as the read path sees it."""

    image_id: int
    url: str
    size_bytes: int
    block_size: int  # cache and fetch unit, a multiple of digest_block_size
    digest_block_size: int
    digests_path: str | None = None  # None: no per-block digests (single-image mount)
    digests_sha256: str | None = None
    digests: list[bytes] | None = None
    validator: str | None = None  # ETag/Last-Modified pinned by the first reply
    load_lock: trio.Lock = field(default_factory=trio.Lock)


_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _certificate_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The failed server certificate check behind an httpx error, if that is what it is."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _http_error(exc: httpx.HTTPError) -> FetchError:
    """A transient FetchError, unless the server's certificate failed verification: retrying
    cannot fix that."""
    cert_error = _certificate_failure(exc)
    if cert_error is None:
        return FetchError((str(exc) or type(exc).__name__).splitlines()[0], transient=True)
    reason = (cert_error.verify_message or "").rstrip(".")
    detail = f": {reason}" if reason else ""
    if cert_error.verify_code in _NAME_MISMATCH:
        hint = "use the host name or address the certificate names"
    else:
        hint = "use -o cafile= for a private CA"
    return FetchError(f"TLS certificate verification failed{detail} ({hint})", transient=False)


def _status_hint(status: int, www_authenticate: str, url: str) -> str:
    """What to check when a metadata GET is refused."""
    if status == 401 and www_authenticate.lower().startswith("basic"):
        return " (check -o netrc=)"
    if status in (401, 403):
        return " (check -o token_file=)"
    if status == 404:
        return " (is this a backupfs store? run `backupfs index` on it)"
    if status == 400 and url.startswith("https:"):
        return " (does the server want a client certificate? -o cert=,key=)"
    return ""


class StoreClient:
    def __init__(
        self, client: httpx.AsyncClient, base_url: str, opts: MountOptions, stats: Stats
    ) -> None:
        self.client = client
        self.base_url = base_url
        self.opts = opts
        self.stats = stats
        self.limiter = trio.CapacityLimiter(opts.connections)

    def url(self, path: str) -> str:
        return self.base_url + quote(path)

    async def with_retries(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run `attempt` until it succeeds, fails for good, or retries run out."""
        for n in range(self.opts.retries + 1):
            try:
                return await attempt()
            except FetchError as exc:
                if not exc.transient or n == self.opts.retries:
                    raise
                delay = min(_BACKOFF_FIRST_S * 2**n, _BACKOFF_MAX_S) * random.uniform(0.5, 1)
                log.info("%s: %s; retrying in %.2fs", what, exc, delay)
                self.stats.retries += 1
                await trio.sleep(delay)
        raise AssertionError("unreachable")

    async def _get(
        self, url: str, headers: dict[str, str], limit: int, sink: Callable[[bytes], None]
    ) -> httpx.Headers:
        """One GET under the connection limit, whole within `timeout`; body (at most `limit`
        bytes) handed to `sink` chunk by chunk."""
        async with self.limiter:
            self.stats.requests += 1
            self.stats.requests_in_flight += 1
            start = trio.current_time()
            try:
                with trio.fail_after(self.opts.timeout):
                    return await self._get_body(url, headers, limit, sink)
            except trio.TooSlowError:
                message = f"timed out after {self.opts.timeout:g}s"
                raise FetchError(message, transient=True) from None
            except httpx.HTTPError as exc:
                raise _http_error(exc) from None
            finally:
                self.stats.requests_in_flight -= 1
                self.stats.record_fetch(trio.current_time() - start)

    async def _get_body(
        self, url: str, headers: dict[str, str], limit: int, sink: Callable[[bytes], None]
    ) -> httpx.Headers:
        async with self.client.stream("GET", url, headers=headers) as resp:
            if headers.get("Range"):
                checks.check_status(resp.status_code, redact(url))
            elif resp.status_code != 200:
                status = resp.status_code
                hint = _status_hint(status, resp.headers.get("WWW-Authenticate", ""), url)
                transient = status >= 500 or status == 429
                raise FetchError(f"HTTP {status}{hint}", transient=transient, status=status)
            received = 0
            async for chunk in resp.aiter_raw():
                received += len(chunk)
                if received > limit:
                    raise FetchError("reply longer than asked for", transient=True)
                sink(chunk)
            return resp.headers

    async def get_metadata(self, path: str) -> bytes:
        """A whole metadata file; failures become one-line StoreErrors."""
        url = self.url(path)

        async def attempt() -> bytes:
            chunks: list[bytes] = []
            await self._get(url, {}, MAX_METADATA_BYTES, chunks.append)
            return b"".join(chunks)

        try:
            return await self.with_retries(attempt, redact(url))
        except FetchError as exc:
            raise StoreError(f"cannot read {redact(url)}: {exc}") from None

    async def probe_range(self, image: Image) -> None:
        """One ranged GET of the image's first byte: the store must honour Range."""
        if image.size_bytes == 0:
            return
        try:
            headers = await self.with_retries(
                lambda: self._get(image.url, {"Range": "bytes=0-0"}, 1, lambda _: None),
                redact(image.url),
            )
            image.validator = checks.check_range_headers(headers, 0, 1, image.size_bytes, None)
        except FetchError as exc:
            if exc.status == 200:
                raise StoreError(
                    f"{redact(self.base_url)}: the server ignores Range requests "
                    "(answered 200 to a ranged GET); backupfs needs a server that honours Range"
                ) from None
            raise StoreError(f"cannot read {redact(image.url)}: {exc}") from None

    async def fetch_range(self, image: Image, start: int, end: int, block_size: int) -> list[bytes]:
        """Bytes `[start, end)` of an image, verified, cut into cache blocks."""
        headers = {"Range": f"bytes={start}-{end - 1}"}

        async def attempt() -> list[bytes]:
            body = checks.BlockAssembler(block_size)
            reply_headers = await self._get(image.url, headers, end - start, body.feed)
            validator = checks.check_range_headers(
                reply_headers, start, end, image.size_bytes, image.validator
            )
            if body.size_bytes != end - start:
                raise FetchError(f"short body: {body.size_bytes} of {end - start}", transient=True)
            if image.validator is None:
                image.validator = validator
            self.stats.bytes_fetched += end - start
            blocks = body.finish()
            try:
                await trio.to_thread.run_sync(
                    checks.verify_blocks, blocks, start, image.digests, image.digest_block_size
                )
            except FetchError:
                self.stats.verify_failures += 1
                raise
            return blocks

        return await self.with_retries(attempt, f"{redact(image.url)} [{start},{end})")
