"""The daemon's side of read plans (see plan_channel.py for the protocol).

A restore plan is prefetched in its order, at most `ahead_bytes` beyond what the readers
have consumed so far (the reader's PlanBook moves the plan's cursor); a warm plan is fetched
whole, up to what the cache holds, with progress reported to the client.
"""

import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator

import trio

from backupfs.errors import FetchError, StoreError
from backupfs.mount.tree import ROOT_INODE, Tree
from backupfs.plan.channel import MAX_LINE_BYTES, encode, socket_address
from backupfs.readpath.blocks import BlockReader
from backupfs.readpath.plans import PlanCursor
from backupfs.remote.metadata import DigestLoader
from backupfs.store.image import Image

log = logging.getLogger(__name__)
Range = tuple[int, int]
_PROGRESS_EVERY_S = 0.5
_POLL_S = 0.05


class PlanError(Exception):
    """A malformed or unusable plan; the client gets the message."""


async def _messages(stream: trio.SocketStream) -> AsyncIterator[dict[str, object]]:
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            message = json.loads(line)
            if not isinstance(message, dict):
                raise PlanError("a message must be a JSON object")
            yield message
        if len(buf) > MAX_LINE_BYTES:
            raise PlanError("message too long")
        data = await stream.receive_some(1 << 16)
        if not data:
            return
        buf += data


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
    ) -> None:
        self.tree, self.digests, self.reader = tree, digests, reader
        self.ahead_bytes = ahead_bytes  # restore plans: prefetched beyond what was read
        self.warm_bytes = warm_bytes  # warm plans: at most this much, so it stays cached
        self.warm_window_bytes = warm_window_bytes  # warm plans: fetched ahead of the wait
        self.allow_other = allow_other

    async def serve(
        self, mountpoint: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(socket_address(mountpoint))
        except OSError as exc:
            log.warning("read plans disabled: cannot listen: %s", exc)
            task_status.started()
            return
        sock.listen(16)
        task_status.started()
        await trio.serve_listeners(self._handle, [trio.SocketListener(sock)])

    def _allowed(self, sock: trio.socket.SocketType) -> bool:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        uid = struct.unpack("3i", creds)[1]
        return self.allow_other or uid in (0, os.getuid())

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if not self._allowed(stream.socket):
                return
            try:
                await self._session(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except (PlanError, StoreError, ValueError) as exc:
                log.warning("read plan refused: %s", exc)
                message = {"done": True, "error": str(exc), "fetched": 0, "total": 0}
                with trio.move_on_after(1):
                    await stream.send_all(encode(message))

    def _image(self, rel: object) -> Image:
        node = self.tree.nodes[ROOT_INODE]
        for name in str(rel).split("/"):
            found = self.tree.lookup(node.inode, name)
            if found is None:
                raise PlanError(f"no image {rel} in this mount")
            node = found
        if node.image is None:
            raise PlanError(f"{rel} is a directory")
        return node.image

    def _ranges(self, message: dict[str, object], image: Image) -> list[Range]:
        """The message's ranges clipped to the image, cut into request-sized pieces."""
        out: list[Range] = []
        step = self.reader.request_size
        for item in message.get("ranges") or []:  # type: ignore[attr-defined]
            start, end = max(0, int(item[0])), min(image.size_bytes, int(item[1]))
            out.extend((s, min(s + step, end)) for s in range(start, end, step))
        return out

    async def _session(self, stream: trio.SocketStream) -> None:
        messages = _messages(stream)
        head = await anext(messages, None)
        if head is None:
            return
        image = self._image(head.get("image"))
        await self.digests.ensure(image)
        if head.get("mode") == "warm":
            await self._warm(image, messages, stream)
        elif head.get("mode") == "restore":
            await self._restore(image, messages)
        else:
            raise PlanError(f"unknown plan mode {head.get('mode')!r}")

    async def _restore(self, image: Image, messages: AsyncIterator[dict[str, object]]) -> None:
        ranges: list[Range] = []
        cursor = PlanCursor()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._prefetch_ahead, image, ranges, cursor)
                async for message in messages:
                    ranges.extend(self._ranges(message, image))
                nursery.cancel_scope.cancel()  # the client closed: the restore is over
        finally:
            self.reader.forget_plan(cursor)

    async def _prefetch_ahead(self, image: Image, ranges: list[Range], cursor: PlanCursor) -> None:
        """Keep the plan fetched up to `ahead_bytes` past the furthest reader. Positions,
        not bytes served, measure progress: bytes merged in across small gaps are never
        read, and bytes the page cache already holds are never served."""
        planned, i = 0, 0
        while True:
            while i < len(ranges) and planned < cursor.position + self.ahead_bytes:
                start, end = ranges[i]
                planned += end - start
                self.reader.plan(image, start, end, cursor, planned)
                i += 1
            with trio.move_on_after(_POLL_S):  # new ranges arrive without an event
                await cursor.moved.wait()

    async def _warm(
        self,
        image: Image,
        messages: AsyncIterator[dict[str, object]],
        stream: trio.SocketStream,
    ) -> None:
        ranges: list[Range] = []
        async for message in messages:
            ranges.extend(self._ranges(message, image))
            if message.get("end"):
                break
        total = sum(e - s for s, e in ranges)
        fetched, error = 0, None
        window = self.warm_window_bytes
        async with trio.open_nursery() as nursery:

            async def report() -> None:
                while True:
                    await trio.sleep(_PROGRESS_EVERY_S)
                    await stream.send_all(encode({"fetched": fetched, "total": total}))

            nursery.start_soon(report)
            started, started_bytes = 0, 0
            try:
                for start, end in ranges:
                    if fetched + (end - start) > self.warm_bytes:
                        error = f"stopped at the cache size ({self.warm_bytes} bytes)"
                        break
                    while started < len(ranges) and started_bytes < fetched + window:
                        self.reader.prefetch(image, *ranges[started])
                        started_bytes += ranges[started][1] - ranges[started][0]
                        started += 1
                    await self.reader.fetched(image, start, end)
                    fetched += end - start
            except FetchError as exc:
                error = str(exc)
            nursery.cancel_scope.cancel()
        self.reader.stats.plan_bytes += fetched
        done = {"fetched": fetched, "total": total, "done": True, "error": error}
        await stream.send_all(encode(done))
