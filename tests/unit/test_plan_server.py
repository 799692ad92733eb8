"""The read-plan server (mount.plan_server) against hostile clients, and the plan client
(plan.readplan.PlanSession) against hostile daemons, over real Unix sockets, no mount.

Whatever a client sends, the server answers with one error line and closes that one
connection; its task returns (in the daemon it shares a nursery with the FUSE loop).
"""

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from backupfs.mount.plan_server import PlanLimits, PlanServer
from backupfs.mount.tree import ROOT_INODE, Tree
from backupfs.plan import channel
from backupfs.plan.readplan import ImageSource, PlanSession
from backupfs.readpath.plans import PlanCursor
from backupfs.stats import Stats
from backupfs.store.image import Image

SIZE = 1 << 20
IMAGE = "h/s/d.img"
RESTORE = {"image": IMAGE, "mode": "restore"}
WARM = {"image": IMAGE, "mode": "warm"}


class FakeReader:
    """What the plan server asks of a BlockReader, recorded (at most 10,000 planned)."""

    def __init__(self, request_size: int = 4096) -> None:
        self.request_size, self.stats = request_size, Stats()
        self.planned: list[tuple[int, int, int]] = []  # (start, end, position)
        self.prefetched = self.fetched_calls = self.forgotten = 0
        self.fail: Exception | None = None
        self.cursor: PlanCursor | None = None  # of the last plan

    def plan(self, image: Image, start: int, end: int, cursor: PlanCursor, pos: int) -> None:
        if self.fail is not None:
            raise self.fail
        self.cursor = cursor
        if len(self.planned) < 10_000:
            self.planned.append((start, end, pos))

    def prefetch(self, image: Image, start: int, end: int) -> None:
        self.prefetched += 1

    async def fetched(self, image: Image, start: int, end: int) -> None:
        self.fetched_calls += 1
        await trio.lowlevel.checkpoint()

    def forget_plan(self, cursor: PlanCursor) -> None:
        self.forgotten += 1


class FakeDigests:
    async def ensure(self, image: Image) -> None:
        await trio.lowlevel.checkpoint()

    async def ensure_served(self, image: Image) -> None:
        await self.ensure(image)


def _server(
    reader: FakeReader | None = None, size: int = SIZE, **limits: float
) -> tuple[PlanServer, FakeReader]:
    reader = reader or FakeReader()
    tree = Tree()
    snap = tree.add(tree.add(ROOT_INODE, "h", 0).inode, "s", 0)
    tree.add(snap.inode, "d.img", 0, Image(4, "http://x/h/s/d.img", size, 4096, 4096))
    server = PlanServer(
        tree, FakeDigests(), reader,  # type: ignore[arg-type]
        ahead_bytes=64 << 10, warm_bytes=1 << 20, warm_window_bytes=64 << 10,
        allow_other=False, limits=PlanLimits(**limits),  # type: ignore[arg-type]
    )  # fmt: skip
    return server, reader


def _line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (trio.SocketStream(trio.socket.from_stdlib_socket(a)),
            trio.SocketStream(trio.socket.from_stdlib_socket(b)))  # fmt: skip


async def _read_replies(stream: trio.SocketStream) -> list[dict[str, object]]:
    data = b""
    with contextlib.suppress(trio.BrokenResourceError):  # ECONNRESET after the reply
        while chunk := await stream.receive_some(1 << 16):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


async def _exchange(
    server: PlanServer, *lines: bytes, close: bool = True, settle: bool = False
) -> list[dict[str, object]]:
    """Send `lines` to a served connection, close our side (after the server did all it
    could with them, if `settle`), return every reply; the server's task must end, and
    without an exception."""
    ours, theirs = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, theirs)
        with contextlib.suppress(trio.BrokenResourceError):  # it hung up on us
            for line in lines:
                await ours.send_all(line)
            if settle:
                await trio.testing.wait_all_tasks_blocked()
            if close:
                await ours.send_eof()
        replies = await _read_replies(ours)
    await ours.aclose()
    return replies


def _error_of(replies: list[dict[str, object]]) -> str:
    assert len(replies) == 1 and replies[0]["done"] is True, replies
    error = replies[0]["error"]
    assert isinstance(error, str) and "\n" not in error
    return error


DEEP = b"[" * 100_000 + b"]" * 100_000 + b"\n"
HOSTILE = {
    "ranges not a list": (_line({"ranges": 5}), "ranges must be a list"),
    "null start": (_line({"ranges": [[None, 1]]}), "a range must be a list of two integers"),
    "boolean": (_line({"ranges": [[True, 5]]}), "a range must be a list of two integers"),
    "three ends": (_line({"ranges": [[0, 1, 2]]}), "a range must be a list of two integers"),
    "float": (b'{"ranges": [[0, 1.5]]}\n', "a range must be a list of two integers"),
    "Infinity": (b'{"ranges": [[0, Infinity]]}\n', "Infinity is not JSON"),
    "NaN": (b'{"ranges": [[NaN, 1]]}\n', "NaN is not JSON"),
    "bare NaN": (b"NaN\n", "NaN is not JSON"),
    "deep nesting": (DEEP, "message nested too deeply"),
    "not an object": (b"[1, 2]\n", "a message must be a JSON object"),
    "a string": (b'"ranges"\n', "a message must be a JSON object"),
    "not UTF-8": (b"\xff\xfe\n", "not JSON: "),
    "not JSON": (b"{ranges}\n", "not JSON: "),
    "5000 digits": (b'{"ranges": [[0, ' + b"9" * 5000 + b"]]}\n", "not JSON: "),
    "past the end": (_line({"ranges": [[0, SIZE + 1]]}), f"[0, {SIZE + 1}) is not a range"),
    "huge": (_line({"ranges": [[0, 10**30]]}), "a range is not a range within the image"),
    "negative": (_line({"ranges": [[-1, 5]]}), "[-1, 5) is not a range within"),
    "empty": (_line({"ranges": [[5, 5]]}), "[5, 5) is not a range within"),
    "too many": (_line({"ranges": [[0, 1]] * 4097}), "more than 4096 ranges in one message"),
    "end not a boolean": (_line({"end": "yes"}), "end must be true or false"),
    "too long a line": (b"x" * (channel.MAX_LINE_BYTES + 1), "message longer than 1048576"),
}


@pytest.mark.parametrize("mode", ["restore", "warm"])
@pytest.mark.parametrize(("line", "error"), HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_malformed_message_ends_only_its_connection(
    mode: str, line: bytes, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, reader = _server()
    replies = await _exchange(server, _line({"image": IMAGE, "mode": mode}), line)
    assert error in _error_of(replies)
    assert reader.planned == [] and reader.fetched_calls == 0
    assert reader.forgotten == (mode == "restore")  # the plan's bookkeeping is dropped
    refused = [r for r in caplog.records if r.name == "backupfs.mount.plan_server"]
    assert [(r.levelno, r.exc_info) for r in refused] == [(logging.WARNING, None)]
    assert server.sessions == 0
    # The server goes on: the next client is served.
    good = await _exchange(server, _line(WARM), _line({"ranges": [[0, 8192]], "end": True}))
    assert good[-1] == {"fetched": 8192, "total": 8192, "done": True, "error": None}


HEADS = {
    "not an object": (b"[]\n", "a message must be a JSON object"),
    "no image": (_line({"mode": "warm"}), "the first message must name an image"),
    "image not a string": (_line({"image": 5, "mode": "warm"}), "must name an image"),
    "unknown mode": (_line({"image": IMAGE, "mode": "x"}), "unknown plan mode 'x'"),
    "no such image": (_line({"image": "h/../d.img", "mode": "warm"}), "no image 'h/../d.img'"),
    "a directory": (_line({"image": "h/s", "mode": "warm"}), "'h/s' is a directory"),
    "through an image": (_line({"image": IMAGE + "/x", "mode": "warm"}), "no image"),
    "lone surrogate": (_line({"image": "h/\ud800", "mode": "warm"}), "no image 'h/\\ud800'"),
    "long": (_line({"image": IMAGE, "mode": "x" * 10_000}), "unknown plan mode 'xxx"),
    "deep nesting": (DEEP, "message nested too deeply"),
}


@pytest.mark.parametrize(("line", "error"), HEADS.values(), ids=HEADS.keys())
async def test_a_malformed_first_message_is_refused(line: bytes, error: str) -> None:
    server, _ = _server()
    reason = _error_of(await _exchange(server, line))
    assert error in reason and len(reason) <= 300


async def test_a_restore_plan_is_planned_in_order_in_request_sized_pieces() -> None:
    server, reader = _server()
    plan = {"ranges": [[0, 10_000], [20_000, 24_096]]}
    ours, theirs = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, theirs)
        await ours.send_all(_line(RESTORE) + _line(plan) + _line({"end": True}))
        await trio.testing.wait_all_tasks_blocked()
        assert reader.planned == [
            (0, 4096, 4096), (4096, 8192, 8192), (8192, 10_000, 10_000),
            (20_000, 24_096, 14_096),
        ]  # fmt: skip
        await ours.send_eof()
        assert await _read_replies(ours) == []
    assert reader.forgotten == 1


async def test_huge_ranges_are_cut_only_as_they_are_used() -> None:
    """One range over a 4 GiB image, in 4 KiB requests, is a million pieces: they are made
    one at a time, as the warm's fetches or the restore's readers get to them."""
    size = 1 << 32
    server, reader = _server(size=size)
    whole = {"ranges": [[0, size]], "end": True}
    tracemalloc.start()
    try:
        warm = await _exchange(server, _line(WARM), _line(whole))
        restore = await _exchange(server, _line(RESTORE), _line(whole), settle=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert warm[-1]["error"] == "stopped at the cache size (1048576 bytes)"
    assert warm[-1]["fetched"] == 1 << 20 and warm[-1]["total"] == size
    assert reader.fetched_calls == 256 and reader.prefetched <= 256 + 16
    assert restore == []
    assert len(reader.planned) == 16  # ahead_bytes 64 KiB: the readers read nothing
    assert peak < 4 << 20, peak


async def test_a_plan_may_hold_only_so_many_ranges_and_bytes() -> None:
    server, _ = _server(session_ranges=10)
    message = {"ranges": [[i, i + 1] for i in range(0, 22, 2)]}
    assert _error_of(await _exchange(server, _line(WARM), _line(message))) == (
        "plan of more than 10 ranges"
    )
    server, _ = _server(session_bytes=4000)
    lines = [_line({"ranges": [[0, 1]] * 100})] * 10  # valid, 1000 bytes each
    assert _error_of(await _exchange(server, _line(RESTORE), *lines)) == (
        "plan larger than 4000 bytes"
    )


async def test_sessions_beyond_the_limit_are_refused_at_once() -> None:
    server, _ = _server(sessions=2)
    held = [_pair() for _ in range(2)]
    async with trio.open_nursery() as nursery:
        for ours, theirs in held:
            nursery.start_soon(server.handle, theirs)
            await ours.send_all(_line(RESTORE))
        await trio.testing.wait_all_tasks_blocked()
        assert server.sessions == 2
        with trio.fail_after(5):
            replies = await _exchange(server, _line(RESTORE))
        assert _error_of(replies) == "2 read plans at once already"
        for ours, _ in held:
            await ours.aclose()
    assert server.sessions == 0


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ([], "no message for 10s"),
        ([_line(WARM)], "no message for 600s"),
        ([_line(WARM), b'{"ranges": [[0, 1]'], "no message for 600s"),  # a line never ends
        ([_line(RESTORE)], "idle for 600s"),
        ([_line(RESTORE), _line({"ranges": [[0, 8192]], "end": True})], "idle for 600s"),
    ],
    ids=["no head", "warm", "half a line", "restore", "restore after its end"],
)
async def test_a_silent_client_is_dropped(
    lines: list[bytes], error: str, autojump_clock: trio.testing.MockClock
) -> None:
    server, _ = _server()
    with trio.fail_after(10_000):
        assert _error_of(await _exchange(server, *lines, close=False)) == error


async def test_a_restore_being_read_is_not_idle(autojump_clock: trio.testing.MockClock) -> None:
    """A restore keeps its connection open, silent, while it copies: its reads move the
    plan's cursor (as BlockReader._served does), and that is not idleness."""
    server, reader = _server()
    ours, theirs = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, theirs)
        await ours.send_all(_line(RESTORE) + _line({"ranges": [[0, SIZE]], "end": True}))
        await trio.testing.wait_all_tasks_blocked()
        assert reader.cursor is not None
        for step in range(1, 5):
            await trio.sleep(500)  # 2000 s in all, the idle limit is 600 s
            reader.cursor.advance(step * 100_000)
        assert server.sessions == 1
        await ours.send_eof()
        assert await _read_replies(ours) == []
    assert server.sessions == 0


async def test_a_failure_of_the_read_path_is_an_internal_error_not_a_dead_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader = FakeReader()
    reader.fail = RuntimeError("boom")
    server, _ = _server(reader)
    replies = await _exchange(server, _line(RESTORE), _line({"ranges": [[0, 1]]}), settle=True)
    assert _error_of(replies) == "internal error in the daemon (see its log)"
    failed = [r for r in caplog.records if r.name == "backupfs.mount.plan_server"]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert "read plan failed" in failed[0].getMessage()


async def test_the_listener_outlives_hostile_clients(tmp_path: Path) -> None:
    server, _ = _server()
    address = channel.socket_address(str(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, str(tmp_path))
        for line, _ in HOSTILE.values():
            stream = await trio.open_unix_socket(address)
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(_line(RESTORE) + line)
                await stream.send_eof()
            assert _error_of(await _read_replies(stream))
            await stream.aclose()
        stream = await trio.open_unix_socket(address)
        await stream.send_all(_line(WARM) + _line({"ranges": [[0, 4096]], "end": True}))
        assert (await _read_replies(stream))[-1]["error"] is None
        await stream.aclose()
        nursery.cancel_scope.cancel()


# --- the client: PlanSession ---


def _source(mountpoint: Path) -> ImageSource:
    return ImageSource(str(mountpoint), IMAGE, 0, "ext4")


@contextlib.contextmanager
def _fake_daemon(mountpoint: Path, behave: str) -> Iterator[list[bytes]]:
    """A daemon of our own uid in a thread: it takes one connection and then `behave`s:
    "silent" (reads, never answers), "garbage" (answers nonsense), "hang up" (closes
    after the first message)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(channel.socket_address(str(mountpoint)))
    listener.listen(1)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(0.1)
            first = conn.recv(1 << 16)
            got.append(first)
            if behave == "hang up":
                return
            if behave == "garbage":
                conn.sendall(b'{"fetched": "lots", "total": 1}\n')
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    if not conn.recv(1 << 16):
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.mark.parametrize(
    ("behave", "error"),
    [
        ("silent", "the daemon did not answer for 0.2s"),
        ("garbage", "a malformed reply from the daemon: fetched must be a non-negative integer"),
    ],
)
def test_a_daemon_that_does_not_answer_properly_ends_the_replies(
    tmp_path: Path, behave: str, error: str
) -> None:
    with _fake_daemon(tmp_path, behave):
        session = PlanSession.open(_source(tmp_path), "warm", timeout_s=0.2)
        assert session is not None
        try:
            assert session.send([(0, 4096)]) == 4096
            replies = list(session.replies())
        finally:
            session.close()
    assert replies == [{"fetched": 0, "total": 0, "done": True, "error": error}]


def test_a_daemon_that_hangs_up_ends_the_sending_not_the_caller(tmp_path: Path) -> None:
    with _fake_daemon(tmp_path, "hang up") as got:
        session = PlanSession.open(_source(tmp_path), "restore", timeout_s=5)
        assert session is not None
        try:
            ranges = [(i << 20, (i << 20) + 4096) for i in range(200_000)]  # MBs of messages
            sent = session.send(ranges)
        finally:
            session.close()
    assert sent < 200_000 * 4096
    assert json.loads(got[0].splitlines()[0]) == RESTORE


def _impostor(address: bytes, uid: int) -> int:
    """Fork a process that binds `address` as `uid` and holds it; its PID once it listens."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(ready_r)
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(address)
            sock.listen(1)
            os.write(ready_w, b"R")
            sock.settimeout(10)
            sock.accept()[0].recv(1)
        finally:
            os._exit(0)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        assert ready.read(1) == b"R"
    return pid


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another user")
def test_a_socket_held_by_another_user_gets_no_plan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The abstract name is anyone's to bind first: a process of another user that
    squats on it must not be sent the plan (it names the files being restored)."""
    pid = _impostor(channel.socket_address(str(tmp_path)), 65534)
    try:
        with caplog.at_level(logging.WARNING, "backupfs.plan.readplan"):
            assert PlanSession.open(_source(tmp_path), "warm") is None
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert any("held by uid 65534" in r.getMessage() for r in caplog.records)
