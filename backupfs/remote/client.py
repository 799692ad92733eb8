"""HTTP access to a store: metadata GETs and verified ranged GETs, with retries.

One `httpx.AsyncClient` per connection, each with a pool of one, and a limiter in front
of them so that waiting for a connection happens here and never inside httpx: FIFO, with
demand reads before prefetches (limiter.py). One client of 16 connections would cost more
CPU than the whole body of a request: httpcore's pool checks every connection it holds
(`has_expired`, a poll(2) each) whenever a request starts or ends, about 1.5 ms of CPU per
request here; a pool of one checks one (measured in docs/benchmarks.md, "CPU per byte").
"""

import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import httpcore
import httpx
import trio

from backupfs.errors import FetchError, StoreError, UsageError
from backupfs.options import MountOptions
from backupfs.remote import checks, s3errors
from backupfs.remote.credentials import Credentials
from backupfs.remote.failures import http_error, status_hint
from backupfs.remote.limiter import PriorityLimiter
from backupfs.stats import Stats
from backupfs.store.digestfile import DIGEST_SIZE
from backupfs.store.image import Image

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_METADATA_BYTES = 1 << 30  # the largest metadata file (a digest file: 2 TiB at 64 KiB)
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 4.0


def backoff_s(n: int) -> float:
    """How long to wait before attempt `n + 1`: exponential, capped, jittered."""
    return min(_BACKOFF_FIRST_S * 2**n, _BACKOFF_MAX_S) * random.uniform(0.5, 1)


def check_base_url(url: str) -> str:
    """The store URL with a trailing slash; credentials in it are refused (ps would show them)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"not an http(s) URL: {redact(url)}")
    if parts.username or parts.password:
        raise UsageError("credentials in the URL are refused; use -o token_file= or -o netrc=")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True)
class ClientConfig:
    """What the HTTP client needs of the mount options."""

    connections: int  # parallel connections, and ranged GETs in flight
    timeout_s: float  # one whole attempt, body included
    retries: int  # further attempts after a transient failure
    s3: bool = False  # the store is a bucket: error replies are S3's XML (s3errors.py)

    @classmethod
    def from_options(cls, opts: MountOptions, s3: bool = False) -> "ClientConfig":
        return cls(opts.connections, opts.timeout, opts.retries, s3)


# httpcore receives at most 64 KiB per socket read (`READ_NUM_BYTES`, a class attribute of
# its HTTP/1.1 connection); bodies here are megabytes, and larger reads halve the CPU spent
# per byte (measured: 250 -> 470+ MB/s on loopback). Tested with httpcore 1.0.x; the unit
# test tests/unit/test_client.py fails if the attribute goes away.
SOCKET_READ_BYTES = 1 << 20


def enlarge_socket_reads() -> None:
    """Let httpcore read up to SOCKET_READ_BYTES per socket read. Called once by the daemon
    (and by `backupfs ls`) before the client is made; a process-wide class attribute."""
    http11 = httpcore.AsyncHTTP11Connection
    if not hasattr(http11, "READ_NUM_BYTES"):
        raise RuntimeError("httpcore.AsyncHTTP11Connection.READ_NUM_BYTES is gone: see client.py")
    if http11.READ_NUM_BYTES < SOCKET_READ_BYTES:
        http11.READ_NUM_BYTES = SOCKET_READ_BYTES


@contextlib.asynccontextmanager
async def make_clients(
    config: ClientConfig, creds: Credentials
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`config.connections` clients of one connection each, closed on exit."""
    headers = {"Accept-Encoding": "identity", "User-Agent": "backupfs", **creds.headers()}
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    headers=headers,
                    auth=creds.auth(),
                    verify=creds.ssl_context,
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                    timeout=httpx.Timeout(config.timeout_s),
                    follow_redirects=False,
                )
            )
            for _ in range(config.connections)
        ]
        yield clients


class StoreClient:
    def __init__(
        self,
        clients: Sequence[httpx.AsyncClient],
        base_url: str,
        config: ClientConfig,
        stats: Stats,
    ) -> None:
        self.base_url = base_url
        self.config = config
        self.stats = stats
        self.limiter = PriorityLimiter(len(clients))  # demand reads first
        # The clients not in use; the last one released is taken first: its connection
        # is the one most likely still open.
        self._idle = list(clients)

    def url(self, path: str) -> str:
        return self.base_url + quote(path)

    async def with_retries(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run `attempt` until it succeeds, fails for good, or retries run out."""
        for n in range(self.config.retries + 1):
            try:
                return await attempt()
            except FetchError as exc:
                if not exc.transient or n == self.config.retries:
                    raise
                await self._back_off(n, what, exc)
        raise AssertionError("unreachable")

    async def _back_off(self, n: int, what: str, exc: FetchError) -> None:
        """Wait before attempt `n + 1` (exponential, jittered), and count the retry."""
        delay = backoff_s(n)
        log.info("%s: %s; retrying in %.2fs", what, exc, delay)
        self.stats.retries += 1
        await trio.sleep(delay)

    async def _get(
        self,
        url: str,
        headers: dict[str, str],
        limit: int,
        sink: Callable[[bytes], None],
        on_headers: Callable[[httpx.Headers], None] | None = None,
        urgent: bool = True,
    ) -> httpx.Headers:
        """One GET under the connection limit. It fails when nothing arrives for `timeout`
        seconds (connecting, waiting for the reply, or between two chunks of the body): a
        slow link that keeps delivering is never cut off, a stalled one is. `on_headers`
        checks the reply before its body is read; the body (at most `limit` bytes) goes to
        `sink` chunk by chunk. `urgent`: someone waits for it (not prefetching), so it goes
        before background requests waiting for a connection."""
        timeout_s = self.config.timeout_s
        async with self.limiter.slot(urgent):
            client = self._idle.pop()  # the limiter holds at most one task per client
            self.stats.requests += 1
            self.stats.requests_in_flight += 1
            start = trio.current_time()
            try:
                with trio.CancelScope(deadline=start + timeout_s) as idle:

                    def progressed() -> None:
                        idle.deadline = trio.current_time() + timeout_s

                    return await self._get_body(
                        client, url, headers, limit, sink, on_headers, progressed
                    )
                raise FetchError(f"no data for {timeout_s:g}s", transient=True)
            except httpx.HTTPError as exc:
                raise http_error(exc, url) from None
            finally:
                self._idle.append(client)
                self.stats.requests_in_flight -= 1
                self.stats.record_fetch(trio.current_time() - start)

    async def _get_body(
        self,
        client: httpx.AsyncClient,
        url: str,
        headers: dict[str, str],
        limit: int,
        sink: Callable[[bytes], None],
        on_headers: Callable[[httpx.Headers], None] | None,
        progressed: Callable[[], None],
    ) -> httpx.Headers:
        async with client.stream("GET", url, headers=headers) as resp:
            progressed()
            if self.config.s3 and resp.status_code >= 300:
                await self._raise_s3_error(resp)
            if headers.get("Range"):
                checks.check_status(resp.status_code, redact(url))
            elif resp.status_code != 200:
                status = resp.status_code
                hint = status_hint(status, resp.headers.get("WWW-Authenticate", ""), url)
                transient = status >= 500 or status == 429
                raise FetchError(f"HTTP {status}{hint}", transient=transient, status=status)
            if on_headers is not None:
                on_headers(resp.headers)
            received = 0
            async for chunk in resp.aiter_raw():
                progressed()
                received += len(chunk)
                if received > limit:
                    raise FetchError("reply longer than asked for", transient=True)
                sink(chunk)
            return resp.headers

    async def _raise_s3_error(self, resp: httpx.Response) -> None:
        """Raise the one-line FetchError of an S3 error reply (s3errors.py), if it is one."""
        body = b""
        async for chunk in resp.aiter_raw():
            body += chunk
            if len(body) > s3errors.MAX_ERROR_BYTES:
                return
        error = s3errors.s3_error(resp.status_code, body)
        if error is not None:
            log.debug("%s: %s", redact(str(resp.url)), body[:2000].decode(errors="replace"))
            raise error

    async def get_metadata(self, path: str) -> bytes:
        """A whole metadata file; failures become one-line StoreErrors."""
        return (await self.get_metadata_typed(path))[0]

    async def get_metadata_typed(
        self, path: str, limit: int = MAX_METADATA_BYTES
    ) -> tuple[bytes, str]:
        """A whole metadata file of at most `limit` bytes (a larger one is refused, not
        retried) and the Content-Type the server gave it."""
        url = self.url(path)

        async def attempt() -> tuple[bytes, str]:
            chunks: list[bytes] = []
            size = 0

            def sink(chunk: bytes) -> None:
                nonlocal size
                size += len(chunk)
                if size > limit:
                    raise FetchError(f"larger than {limit} bytes", transient=False)
                chunks.append(chunk)

            headers = await self._get(url, {}, max(limit, MAX_METADATA_BYTES), sink)
            return b"".join(chunks), headers.get("Content-Type", "")

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

    async def get_part(self, path: str, start: int, end: int, total: int) -> bytes:
        """Bytes `[start, end)` of a `total`-byte metadata file: one attempt, FetchError."""
        url = self.url(path)
        chunks: list[bytes] = []

        def check(headers: httpx.Headers) -> None:
            checks.check_range_headers(headers, start, end, total, None)

        await self._get(url, {"Range": f"bytes={start}-{end - 1}"}, end - start,
                        chunks.append, check)  # fmt: skip
        data = b"".join(chunks)
        if len(data) != end - start:
            raise FetchError(f"short body: {len(data)} of {end - start}", transient=True)
        return data

    async def fetch_range(
        self, image: Image, start: int, end: int, block_size: int, urgent: bool = False
    ) -> list[bytes]:
        """Bytes `[start, end)` of an image, verified, cut into cache blocks. Blocks that
        the digests say are zeros (store format 2) are made here, not fetched."""
        runs = await self._zero_runs(image, start, end, block_size)
        if runs is None:
            return await self._fetch_run(image, start, end, block_size, urgent)
        blocks: list[bytes] = []
        for run_start, run_end, zero in runs:
            if zero:
                offsets = range(run_start, run_end, block_size)
                blocks += [checks.zeros(min(block_size, run_end - p)) for p in offsets]
                self.stats.zero_bytes += run_end - run_start
            else:
                blocks += await self._fetch_run(image, run_start, run_end, block_size, urgent)
        return blocks

    async def _zero_runs(
        self, image: Image, start: int, end: int, block_size: int
    ) -> list[tuple[int, int, bool]] | None:
        """`[start, end)` cut into runs of whole cache blocks that are all zeros or not;
        None when no block of it is known to be zeros."""
        digests, dbs = image.digests, image.digest_block_size
        if digests is None or not digests.marks_zeros or start % block_size or block_size % dbs:
            return None
        records = await digests.records(start // dbs, -(-end // dbs))
        runs: list[tuple[int, int, bool]] = []
        per_block = block_size // dbs * DIGEST_SIZE
        for pos in range(start, end, block_size):
            i = (pos - start) // dbs * DIGEST_SIZE
            mine = records[i : i + per_block]
            zero = mine.count(0) == len(mine)
            stop = min(pos + block_size, end)
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], stop, zero)
            else:
                runs.append((pos, stop, zero))
        return None if not any(zero for _, _, zero in runs) else runs

    async def _fetch_run(
        self, image: Image, start: int, end: int, block_size: int, urgent: bool
    ) -> list[bytes]:
        """Bytes `[start, end)`, fetched and verified.

        An attempt that stalls or breaks off mid-body keeps the whole blocks it received
        (verified like any others: verified blocks are blocks) and the next attempt asks
        only for the rest. Only attempts that bring no block count against `retries=`."""
        what = f"{redact(image.url)} [{start},{end})"
        blocks: list[bytes] = []
        pos, failures = start, 0
        while True:
            body = checks.BlockAssembler(block_size)
            try:
                await self._get_range(image, pos, end, body, urgent)
                if body.size_bytes != end - pos:
                    raise FetchError(
                        f"short body: {body.size_bytes} of {end - pos}", transient=True
                    )
                return blocks + await self._verified(image, pos, body.finish())
            except FetchError as exc:
                kept = body.whole_blocks() if exc.transient else []
                if kept:
                    try:
                        kept = await self._verified(image, pos, kept)
                    except FetchError:
                        kept = []
                if kept:
                    log.info("%s: %s; kept %d blocks, asking for the rest", what, exc, len(kept))
                    blocks += kept
                    pos += sum(len(b) for b in kept)
                    continue
                if not exc.transient or failures == self.config.retries:
                    raise
                await self._back_off(failures, what, exc)
                failures += 1

    async def _get_range(
        self, image: Image, start: int, end: int, body: checks.BlockAssembler, urgent: bool
    ) -> None:
        """One ranged GET of `[start, end)` into `body`; the reply's Content-Range and
        validator are checked before any of its bytes are taken."""

        def check(headers: httpx.Headers) -> None:
            validator = checks.check_range_headers(
                headers, start, end, image.size_bytes, image.validator
            )
            if image.validator is None:
                image.validator = validator

        await self._get(image.url, {"Range": f"bytes={start}-{end - 1}"}, end - start,
                        body.feed, check, urgent)  # fmt: skip

    async def _verified(self, image: Image, start: int, blocks: list[bytes]) -> list[bytes]:
        """`blocks` read from `start`, once their SHA-256 digests match the store's."""
        digests, dbs = image.digests, image.digest_block_size
        size = sum(len(b) for b in blocks)
        records = None
        if digests is not None:
            records = await digests.records(start // dbs, -(-(start + size) // dbs))
        marks_zeros = digests is not None and digests.marks_zeros
        try:
            await trio.to_thread.run_sync(
                checks.verify_blocks, blocks, start, records, dbs, marks_zeros
            )
        except FetchError:
            self.stats.verify_failures += 1
            raise
        self.stats.bytes_fetched += size
        return blocks

    async def get_metadata_reply(
        self, path: str, limit: int, etag: str | None = None
    ) -> tuple[bytes, httpx.Headers] | None:
        """A whole metadata file and the reply's headers (its ETag, Content-Type); None when
        `etag` is given and the server answers 304 Not Modified. At most `limit + 1` bytes of
        the body are read: a longer body is cut there, so that the caller sees it is too long
        without taking it all. Failures become one-line StoreErrors."""
        url = self.url(path)
        headers = {"If-None-Match": etag} if etag else {}

        async def attempt() -> tuple[bytes, httpx.Headers] | None:
            chunks: list[bytes] = []
            size = 0

            def sink(chunk: bytes) -> None:
                nonlocal size
                chunks.append(chunk[: limit + 1 - size])
                size += len(chunks[-1])
                if size > limit:
                    raise FetchError(f"larger than {limit} bytes", transient=False, status=200)

            try:
                reply = await self._get(url, headers, max(limit, MAX_METADATA_BYTES), sink)
            except FetchError as exc:
                if exc.status == 304 and etag:
                    return None
                if size > limit:
                    return b"".join(chunks), httpx.Headers()
                raise
            return b"".join(chunks), reply

        try:
            return await self.with_retries(attempt, redact(url))
        except FetchError as exc:
            raise StoreError(f"cannot read {redact(url)}: {exc}") from None
