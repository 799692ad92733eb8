"""Test-only proxies in front of an upstream on 127.0.0.1, each on its own asyncio loop thread.

DelayProxy is a plain TCP relay adding latency (and optionally a bandwidth cap) for benchmarks.
FaultProxy is an HTTP/1.1 relay that injects queued faults into single responses.
Both bind a free loopback port at construction, so `port`/`url` are valid before start();
use them as context managers (`with DelayProxy(port, rtt_ms=20) as p: ... p.url ...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self, get_args

CHUNK = 256 * 1024
MAX_IN_FLIGHT = 32 * 1024 * 1024  # per direction of a delayed connection, like a TCP window
STOP_TIMEOUT_S = 5.0


class _LoopThread:
    """Listening socket plus an asyncio loop in a daemon thread that runs `_handle` per client."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(512)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> Self:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main(ready)),
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()
        if not ready.wait(STOP_TIMEOUT_S):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def stop(self) -> None:
        """Close the listener and every connection (stalls included); join the thread."""
        loop, event, thread = self._loop, self._stop_event, self._thread
        if thread is None:
            self._listener.close()  # never started (or already stopped)
            return
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        thread.join(STOP_TIMEOUT_S)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        accept = asyncio.create_task(self._accept_loop())
        ready.set()
        try:
            await self._stop_event.wait()
        finally:
            accept.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(accept, *self._tasks, return_exceptions=True)
            self._listener.close()
            for _ in range(3):  # let transports run their close callbacks
                await asyncio.sleep(0)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._handle(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, client: socket.socket) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- DelayProxy


class _TokenBucket:
    """Shared link: each write reserves the next n/rate seconds of the link, then waits.

    Up to BURST_S of unused link time is credited back, so that sleep overshoot (timer
    granularity, loop latency) does not lower the average rate below the cap.
    """

    BURST_S = 0.02

    def __init__(self, bytes_per_s: float) -> None:
        self.rate = bytes_per_s
        self.free_at = 0.0
        self.taken = 0  # bytes sent through the link so far

    async def take(self, n: int) -> None:
        self.taken += n
        now = asyncio.get_running_loop().time()
        self.free_at = max(now - self.BURST_S, self.free_at) + n / self.rate
        if self.free_at > now:
            await asyncio.sleep(self.free_at - now)


class DelayProxy(_LoopThread):
    """TCP relay delaying each chunk by rtt_ms/2 per direction, pipelined (no chunk/rtt cap).

    `rate_mbit` caps the downstream (upstream -> client) bytes/s over all connections of this
    proxy together. At most MAX_IN_FLIGHT bytes are buffered per direction, so a slow reader
    pushes back on the sender instead of the proxy buffering whole files.
    """

    def __init__(
        self, upstream_port: int, rtt_ms: float = 0.0, rate_mbit: float | None = None
    ) -> None:
        super().__init__(upstream_port)
        self.delay_s = rtt_ms / 2000.0
        self._bucket = _TokenBucket(rate_mbit * 1e6 / 8) if rate_mbit else None

    @property
    def bytes_down(self) -> int:
        """Bytes sent to clients so far (counted only on a rate-capped proxy)."""
        return self._bucket.taken if self._bucket is not None else 0

    async def _handle(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(upstream, ("127.0.0.1", self.upstream_port))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._relay(client, upstream, None))
                tg.create_task(self._relay(upstream, client, self._bucket))
        except* OSError:
            pass
        finally:
            client.close()
            upstream.close()

    async def _relay(
        self, src: socket.socket, dst: socket.socket, bucket: _TokenBucket | None
    ) -> None:
        if self.delay_s > 0:
            await _DelayedPipe(src, dst, self.delay_s, bucket).run()
            return
        loop = asyncio.get_running_loop()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := await loop.sock_recv_into(src, buf):
            if bucket is not None:
                await bucket.take(n)
            await loop.sock_sendall(dst, view[:n])
        dst.shutdown(socket.SHUT_WR)


class _DelayedPipe:
    """Reader timestamps chunks into a queue; writer sends each at arrival + delay."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, delay_s: float, bucket: _TokenBucket | None
    ) -> None:
        self.src, self.dst, self.delay_s, self.bucket = src, dst, delay_s, bucket
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.in_flight = 0
        self.has_room = asyncio.Event()
        self.has_room.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._read())
            tg.create_task(self._write())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.src, CHUNK)
            self.queue.put_nowait((loop.time() + self.delay_s, data))
            if not data:
                return
            self.in_flight += len(data)
            while self.in_flight >= MAX_IN_FLIGHT:
                self.has_room.clear()
                await self.has_room.wait()

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                self.dst.shutdown(socket.SHUT_WR)
                return
            if self.bucket is not None:
                await self.bucket.take(len(data))
            await loop.sock_sendall(self.dst, data)
            self.in_flight -= len(data)
            if self.in_flight < MAX_IN_FLIGHT:
                self.has_room.set()


# --------------------------------------------------------------------------- FaultProxy

FaultKind = Literal[
    "status503", "reset", "truncate", "stall", "corrupt", "ignore_range", "wrong_range"
]
FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))

Headers = list[tuple[str, str]]


@dataclass
class _Fault:
    kind: FaultKind
    count: int
    path_contains: str
    stall_s: float
    every: int = 1  # fires on every n-th matching request
    seen: int = 0


def _parse_head(head: bytes) -> tuple[list[str], Headers]:
    """Split a request/response head into its first line's words and (name, value) pairs."""
    lines = head.decode("latin-1").split("\r\n")
    headers: Headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0].split(" ", 2), headers


def _get(headers: Headers, name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _shift_range(value: str) -> str:
    return re.sub(r"\d+", lambda m: str(int(m.group()) + 1), value)


def _flip_middle_byte(body: bytes) -> bytes:
    if not body:
        return body
    mid = len(body) // 2
    return body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1 :]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0 so the peer gets an RST (ECONNRESET), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


Upstream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class FaultProxy(_LoopThread):
    """HTTP/1.1 relay (GET/HEAD, keep-alive, Content-Length bodies) injecting queued faults.

    Each fault fires on the next request whose path contains `path_contains`, `count` times:
    status503 (answered without forwarding), reset (headers + half the body, then RST),
    truncate (headers + half the body, then FIN), stall (silence for stall_s, then close),
    corrupt (one body byte flipped), ignore_range (Range removed: 200 with the whole file),
    wrong_range (Range numbers shifted by +1).
    """

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._lock = threading.Lock()
        self._faults: deque[_Fault] = deque()
        self.requests = 0
        self.log: list[tuple[str, str | None]] = []  # (path, Range header) of each request

    def add_fault(
        self,
        kind: FaultKind,
        count: int = 1,
        path_contains: str = "",
        stall_s: float = 60.0,
        every: int = 1,
    ) -> None:
        """Queue a fault for `count` of the requests whose path contains `path_contains`:
        with `every=2`, every other one of them (the others pass untouched)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._faults.append(_Fault(kind, count, path_contains, stall_s, every))

    def faults_left(self) -> int:
        with self._lock:
            return sum(f.count for f in self._faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path_contains in path:
                    fault.seen += 1
                    if fault.seen % fault.every:
                        return None
                    fault.count -= 1
                    if fault.count == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    async def _handle(self, client: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=client)
        upstream: Upstream | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                self.requests += 1
                (method, path, version), headers = _parse_head(head)
                self.log.append((path, _get(headers, "range")))
                length = int(_get(headers, "content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                fault = self._take_fault(path)
                kind = fault.kind if fault else None
                if fault is not None and kind == "stall":
                    await asyncio.sleep(fault.stall_s)
                    return
                if kind == "status503":
                    msg = b"injected fault\n"
                    writer.write(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(msg), msg)
                    )
                    await writer.drain()
                    continue
                if kind == "ignore_range":
                    headers = [(k, v) for k, v in headers if k.lower() != "range"]
                elif kind == "wrong_range":
                    headers = [
                        (k, _shift_range(v) if k.lower() == "range" else v) for k, v in headers
                    ]
                request = f"{method} {path} {version}\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in headers
                )
                out = (request + "\r\n").encode("latin-1") + body
                resp_head, resp_body, upstream = await self._exchange(upstream, out, method)
                if kind == "corrupt":
                    resp_body = _flip_middle_byte(resp_body)
                elif kind in ("reset", "truncate"):
                    writer.write(resp_head + resp_body[: len(resp_body) // 2])
                    await writer.drain()
                    if kind == "reset":
                        _reset(writer)
                    return
                writer.write(resp_head + resp_body)
                await writer.drain()
                if (_get(headers, "connection") or "").lower() == "close":
                    return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # client or upstream went away or spoke garbage: drop the connection
        finally:
            writer.close()
            if upstream is not None:
                upstream[1].close()

    async def _exchange(
        self, upstream: Upstream | None, request: bytes, method: str
    ) -> tuple[bytes, bytes, Upstream | None]:
        """Send one request, read the full response; reconnect once if a reused conn died."""
        while True:
            reused = upstream is not None
            if upstream is None:
                upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            reader, writer = upstream
            try:
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                break
            except (OSError, asyncio.IncompleteReadError):
                writer.close()
                upstream = None
                if not reused:
                    raise
        (_, status, *_), headers = _parse_head(head)
        code = int(status)
        length = _get(headers, "content-length")
        keep = (_get(headers, "connection") or "").lower() != "close"
        if method == "HEAD" or code in (204, 304) or code < 200:
            body = b""
        elif length is not None:
            body = await reader.readexactly(int(length))
        else:
            body, keep = await reader.read(), False
        if not keep:
            writer.close()
            upstream = None
        return head, body, upstream
