"""The daemon's side of read plans (see plan/channel.py for the protocol).

A restore plan is prefetched in its order, at most `ahead_bytes` beyond what the readers
have consumed so far (the reader's PlanBook moves the plan's cursor); a warm plan is fetched
whole, up to what the cache holds, with progress reported to the client.

Clients are not trusted, and the server runs in the daemon's nursery next to the FUSE
loop: each connection is one task, and whatever goes wrong in it ends that connection
only (a log line, an error reply, the connection closed). Messages are checked by
`channel` before use; a plan's ranges are kept as sent (16 bytes each) and cut into
request-sized pieces only as they are planned or fetched; the number of sessions, what one
session may send and how long it may stay silent are bounded by `PlanLimits`.
"""

import contextlib
import logging
import os
import socket
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import trio

from backupfs.errors import FetchError, StoreError
from backupfs.mount.control import VOLUMES_REL
from backupfs.mount.tree import Tree
from backupfs.mount.volumes import VolumeRefused
from backupfs.plan import channel
from backupfs.plan.channel import MAX_LINE_BYTES, ChannelError, encode, socket_address
from backupfs.readpath.blocks import BlockReader
from backupfs.readpath.plans import PlanCursor
from backupfs.readpath.vdisk import DiskReader
from backupfs.remote.metadata import DigestLoader
from backupfs.store.image import Disk, Served

log = logging.getLogger(__name__)
Range = tuple[int, int]
_PROGRESS_EVERY_S = 0.5
_POLL_S = 0.05
_RECEIVE_BYTES = 1 << 16
_REASON_CHARS = 300  # of an error reply and its log line


@dataclass(frozen=True)
class PlanLimits:
    """What one client may ask of the plan server."""

    sessions: int = 16  # connections served at once; one more is refused at once
    session_bytes: int = 64 << 20  # bytes one connection may send
    session_ranges: int = 1 << 20  # ranges one plan may hold (16 bytes each: 16 MiB)
    head_timeout_s: float = 10.0  # for the first message
    # For each later message; a restore plan may also stay silent while it is being read
    # (its cursor moves), since its client keeps the connection open while it copies.
    idle_timeout_s: float = 600.0
    send_timeout_s: float = 10.0  # for each reply to be taken by the client


class PlanError(Exception):
    """A plan that cannot be served; the client gets the message."""


# Failures that are the client's or the store's: one line in the log, no traceback.
_REFUSALS = (PlanError, ChannelError, StoreError, FetchError)
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Receiver:
    """The messages of one connection, one per line, within the session's byte limit."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit_bytes: int) -> None:
        self.stream = stream
        self.limit_bytes = limit_bytes
        self.received = 0
        self._buf = bytearray()
        self._scanned = 0  # no newline in _buf[:_scanned]

    async def next(self) -> dict[str, object] | None:
        """The next message; None once the client closed its side. ChannelError or
        PlanError for a message that breaks the protocol or the limits."""
        while True:
            newline = self._buf.find(b"\n", self._scanned)
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                self._scanned = 0
                return channel.decode(line)
            self._scanned = len(self._buf)
            if len(self._buf) > MAX_LINE_BYTES:
                raise ChannelError(f"message longer than {MAX_LINE_BYTES} bytes")
            data = await self.stream.receive_some(_RECEIVE_BYTES)
            if not data:
                return None
            self.received += len(data)
            if self.received > self.limit_bytes:
                raise PlanError(f"plan larger than {self.limit_bytes} bytes")
            self._buf += data


class _Ranges:
    """A plan's ranges as sent, flat in an array of int64 (start, end, start, end, ...)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total_bytes = 0
        self._flat = array("q")

    def __len__(self) -> int:
        return len(self._flat) // 2

    def __getitem__(self, i: int) -> Range:
        return self._flat[2 * i], self._flat[2 * i + 1]

    def add(self, ranges: list[Range]) -> None:
        if len(self) + len(ranges) > self.limit:
            raise PlanError(f"plan of more than {self.limit} ranges")
        for start, end in ranges:
            self._flat.extend((start, end))
            self.total_bytes += end - start


class _Pieces:
    """Walks a plan's ranges in pieces of at most `step` bytes, one at a time; resumes
    where it stopped when ranges were added since."""

    def __init__(self, ranges: _Ranges, step: int) -> None:
        self.ranges, self.step = ranges, step
        self._index, self._offset = 0, 0

    def next(self) -> Range | None:
        if self._index >= len(self.ranges):
            return None
        start, end = self.ranges[self._index]
        start = max(start, self._offset)
        stop = min(start + self.step, end)
        if stop >= end:
            self._index, self._offset = self._index + 1, 0
        else:
            self._offset = stop
        return start, stop


class PlanServer:
    def __init__(
        self,
        tree: Tree,
        digests: DigestLoader,
        reader: BlockReader,
        ahead_bytes: int,
        warm_bytes: int,
        warm_window_bytes: int,
        allow_other: bool,
        limits: PlanLimits | None = None,
        disks: DiskReader | None = None,
    ) -> None:
        self.tree, self.digests, self.reader = tree, digests, reader
        self.disks = DiskReader(reader) if disks is None else disks
        self.ahead_bytes = ahead_bytes  # restore plans: prefetched beyond what was read
        self.warm_bytes = warm_bytes  # warm plans: at most this much, so it stays cached
        self.warm_window_bytes = warm_window_bytes  # warm plans: fetched ahead of the wait
        self.allow_other = allow_other
        self.limits = limits or PlanLimits()
        self.sessions = 0  # connections being served now
        self.plans = 0  # of which restore or warm plans (not volume requests)
        # Whether the background fill put a range in the kernel's page cache (set by the
        # daemon when the fill is on): a restore plan does not fetch those bytes again.
        self.filled: Callable[[Served, int, int], bool] = lambda served, start, end: False

    async def serve(
        self, mountpoint: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept plans until cancelled. Never raises: without read plans, reads fall
        back to readahead, and the mount must go on."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(socket_address(mountpoint))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            log.warning("read plans disabled: cannot listen: %s", exc)
            task_status.started()
            return
        task_status.started()
        try:
            await trio.serve_listeners(self.handle, [trio.SocketListener(sock)])
        except Exception:
            log.exception("read plans disabled: the plan server failed")

    def _allowed(self, sock: trio.socket.SocketType) -> bool:
        return self.allow_other or channel.peer_uid(sock) in (0, os.getuid())

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection; no exception escapes (cancellation aside)."""
        async with stream:
            try:
                allowed = self._allowed(stream.socket)
            except OSError as exc:
                log.warning("read plan refused: no peer credentials: %s", exc)
                return
            if not allowed:
                log.info("read plan refused: the client is neither root nor our user")
                return
            if self.sessions >= self.limits.sessions:
                log.warning("read plan refused: %d plans are being served", self.sessions)
                await self._reply_error(stream, f"{self.sessions} read plans at once already")
                return
            self.sessions += 1
            try:
                reason = await self._guarded_session(stream)
            finally:
                self.sessions -= 1
            if reason is not None:
                await self._reply_error(stream, reason)

    async def _guarded_session(self, stream: trio.SocketStream) -> str | None:
        """Run the session; the reason to give the client if it failed."""
        reason = None
        try:
            await self._session(stream)
        except* _GONE:
            pass  # the client went away: nobody to tell
        except* _REFUSALS as group:
            reason = _first_line(group)
            log.warning("read plan refused: %s", reason)
        except* Exception:
            log.exception("read plan failed")
            reason = "internal error in the daemon (see its log)"
        return reason

    async def _reply_error(self, stream: trio.SocketStream, reason: str) -> None:
        message = {"done": True, "error": reason, "fetched": 0, "total": 0}
        with trio.move_on_after(self.limits.send_timeout_s):
            with contextlib.suppress(*_GONE):
                await stream.send_all(encode(message))

    async def _send(self, stream: trio.SocketStream, message: dict[str, object]) -> None:
        try:
            with trio.fail_after(self.limits.send_timeout_s):
                await stream.send_all(encode(message))
        except trio.TooSlowError:
            took = self.limits.send_timeout_s
            raise PlanError(f"the client took no reply for {took:g}s") from None

    async def _next(self, receiver: _Receiver, timeout_s: float) -> dict[str, object] | None:
        try:
            with trio.fail_after(timeout_s):
                return await receiver.next()
        except trio.TooSlowError:
            raise PlanError(f"no message for {timeout_s:g}s") from None

    def _image(self, rel: str) -> Served:
        volumes = VOLUMES_REL + "/"
        if rel.startswith(volumes) and rel[len(volumes) :] in self.tree.volumes.by_name:
            return self.tree.volumes.by_name[rel[len(volumes) :]]
        node = self.tree.find(rel)
        if node is None:
            raise PlanError(f"no image {rel!r} in this mount")
        if node.image is None:
            raise PlanError(f"{rel!r} is a directory")
        return node.image

    def _disk(self, rel: str) -> Disk | None:
        node = self.tree.find(rel)
        return None if node is None else node.image

    async def _session(self, stream: trio.SocketStream) -> None:
        receiver = _Receiver(stream, self.limits.session_bytes)
        head = await self._next(receiver, self.limits.head_timeout_s)
        if head is None:
            return
        if "volume" in head:
            await self._volume(head, stream)
            return
        rel, mode = channel.check_head(head)
        await self.tree.load_path(rel)  # a host of a split catalogue is loaded on first use
        image = self._image(rel)
        self.plans += 1
        try:
            if mode == "warm":
                await self._warm(image, receiver, stream)
            else:
                await self._restore(image, receiver)
        finally:
            self.plans -= 1

    async def _volume(self, head: dict[str, object], stream: trio.SocketStream) -> None:
        request = channel.check_volume(head)
        for rel in {disk for _, _, areas in request.runs for disk, _ in areas}:
            await self.tree.load_path(rel)  # a host of a split catalogue: loaded on first use
        try:
            volume = self.tree.volumes.register(request, self._disk)
        except VolumeRefused as exc:
            raise PlanError(str(exc)) from None
        log.info("serving volume %s (%d bytes, %d runs)", volume.name, volume.size_bytes,
                 len(volume.runs))  # fmt: skip
        path = f"{VOLUMES_REL}/{volume.name}"
        reply: dict[str, object] = {
            "done": True,
            "error": None,
            "path": path,
            "fetched": 0,
            "total": 0,
        }
        await self._send(stream, reply)

    async def _restore(self, image: Served, receiver: _Receiver) -> None:
        ranges = _Ranges(self.limits.session_ranges)
        cursor = PlanCursor()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._prefetch_ahead, image, ranges, cursor)
                await self._receive_restore(image, receiver, ranges, cursor)
                nursery.cancel_scope.cancel()  # the client closed: the restore is over
        finally:
            self.reader.forget_plan(cursor)

    async def _receive_restore(
        self, image: Served, receiver: _Receiver, ranges: _Ranges, cursor: PlanCursor
    ) -> None:
        """Take the plan's messages until the client closes the connection. Idle means
        neither a message nor a read of the plan for `idle_timeout_s`."""
        ended = False
        while True:
            seen = cursor.position
            with trio.move_on_after(self.limits.idle_timeout_s):
                message = await receiver.next()
                if message is None:
                    return
                if ended:
                    raise PlanError("a message after the end of the plan")
                ranges.add(channel.check_ranges(message, image.size_bytes))
                ended = channel.check_end(message)
                continue
            if cursor.position == seen:
                raise PlanError(f"idle for {self.limits.idle_timeout_s:g}s")

    async def _prefetch_ahead(self, image: Served, ranges: _Ranges, cursor: PlanCursor) -> None:
        """Keep the plan fetched up to `ahead_bytes` past the furthest reader. Positions,
        not bytes served, measure progress: bytes merged in across small gaps are never
        read, and bytes the page cache already holds are never served."""
        await self.digests.ensure_served(image)  # meanwhile the plan's messages are taken
        pieces = _Pieces(ranges, self.reader.request_size)
        planned = 0
        while True:
            while planned < cursor.position + self.ahead_bytes:
                piece = pieces.next()
                if piece is None:
                    break
                start, end = piece
                planned += end - start
                if not self.filled(image, start, end):  # else the kernel has it
                    await self.disks.plan(image, start, end, cursor, planned)
            with trio.move_on_after(_POLL_S):  # new ranges arrive without an event
                await cursor.moved.wait()

    async def _warm(self, image: Served, receiver: _Receiver, stream: trio.SocketStream) -> None:
        ranges = _Ranges(self.limits.session_ranges)
        while True:
            message = await self._next(receiver, self.limits.idle_timeout_s)
            if message is None:
                return  # gone before the end of its plan: nobody waits for the result
            ranges.add(channel.check_ranges(message, image.size_bytes))
            if channel.check_end(message):
                break
        await self.digests.ensure_served(image)
        total = ranges.total_bytes
        fetched, error = 0, None
        async with trio.open_nursery() as nursery:

            async def report() -> None:
                while True:
                    await trio.sleep(_PROGRESS_EVERY_S)
                    await self._send(stream, {"fetched": fetched, "total": total})

            nursery.start_soon(report)
            step = self.reader.request_size
            ahead, started_bytes = _Pieces(ranges, step), 0
            walk = _Pieces(ranges, step)
            try:
                while (piece := walk.next()) is not None:
                    start, end = piece
                    if fetched + (end - start) > self.warm_bytes:
                        error = f"stopped at the cache size ({self.warm_bytes} bytes)"
                        break
                    while started_bytes < fetched + self.warm_window_bytes:
                        started = ahead.next()
                        if started is None:
                            break
                        await self.disks.prefetch(image, *started)
                        started_bytes += started[1] - started[0]
                    await self.disks.fetched(image, start, end)
                    fetched += end - start
            except FetchError as exc:
                error = str(exc)
            nursery.cancel_scope.cancel()
        self.reader.stats.plan_bytes += fetched
        await self._send(stream, {"fetched": fetched, "total": total, "done": True, "error": error})


def _first_line(group: BaseExceptionGroup) -> str:
    """The message of the first exception in a (nested) group, on one short line (it may
    quote what the client sent)."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    text = str(first).strip()
    line = text.splitlines()[0] if text else type(first).__name__
    return line if len(line) <= _REASON_CHARS else line[: _REASON_CHARS - 3] + "..."
