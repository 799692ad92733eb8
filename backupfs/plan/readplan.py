"""The client side of read plans: map files in an attached filesystem to byte ranges of
the disk image behind it, and stream them to the daemon that serves the image.

Used by `backupfs restore` (ranges in copying order, prefetched a bounded distance ahead)
and `backupfs warm` (ranges sorted by offset, fetched whole). Anything missing on the way
(no attachment, a filesystem without FIEMAP, a daemon without the channel) means no plan:
reads then fall back to the daemon's readahead.
"""

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from backupfs.attach import state as attach_state
from backupfs.linux.fiemap import Extent, NoFiemap, PathBelow, file_extents, safe_rel
from backupfs.linux.mountinfo import read_mounts
from backupfs.plan import metaprefetch
from backupfs.plan.channel import (
    MAX_LINE_BYTES,
    RANGES_PER_MESSAGE,
    ChannelError,
    check_reply,
    decode,
    encode,
    peer_uid,
    socket_address,
)
from backupfs.plan.extents import PLANNABLE_FS, Range, merge, to_image

log = logging.getLogger(__name__)
MERGE_GAP_BYTES = 64 << 10  # read across gaps this small: one request beats two
MERGE_MAX_BYTES = 8 << 20  # a merged range is sent once it is this long
WHOLE_FILE = 1 << 62  # a size for image_ranges that trims nothing (directories too)
SEND_RANGES = 256  # ranges per message: the daemon gets the start of a plan at once
CONNECT_TIMEOUT_S = 5.0  # to connect to the daemon's plan socket
PLAN_TIMEOUT_S = 30.0  # for each send, and between replies (a warm reports every 0.5 s)


@dataclass(frozen=True)
class ImageSource:
    """Where the bytes of an attached partition come from."""

    mountpoint: str  # the backupfs mount serving the image
    image: str  # the image's path inside that mount
    partition_start: int
    fstype: str


def backupfs_mount(image: str) -> tuple[str, str] | None:
    """(mountpoint, path inside it) of the backupfs mount holding `image`, or None."""
    best = ""
    for m in read_mounts():
        if m.fstype == "fuse.backupfs" and image.startswith(m.mount_point.rstrip("/") + "/"):
            best = max(best, m.mount_point, key=len)
    return (best, os.path.relpath(image, best)) if best else None


def source_of(path: str) -> ImageSource | None:
    """The image and partition under `path`, if it lies in a plannable attachment."""
    where = attach_state.locate(path)
    if where is None:
        return None
    served = backupfs_mount(where.partition.backing or where.attachment.image)
    if served is None or where.mount.fstype not in PLANNABLE_FS:
        return None
    return ImageSource(served[0], served[1], where.partition.start_bytes, where.mount.fstype)


class KnownExtents:
    """Extents read from ext2/3/4 inodes by prefetch_metadata, per (image, partition start)
    and inode number: a plan for those files needs no FIEMAP call, which costs ~0.5 ms per
    file while the restore's own threads keep the process busy. Made by the caller of a
    walk and handed to the plan that follows it."""

    def __init__(self) -> None:
        self._by_source: dict[tuple[str, int], dict[int, list[Extent]]] = {}

    def add(self, source: ImageSource, walked: metaprefetch.Walked) -> None:
        known = self._by_source.setdefault((source.image, source.partition_start), {})
        known.update((n, f.extents) for n, f in walked.files.items() if f.extents is not None)

    def of(self, source: ImageSource) -> dict[int, list[Extent]]:
        return self._by_source.get((source.image, source.partition_start), {})


def image_ranges(
    source: ImageSource, files: Iterable[tuple[str, int, int]], known: KnownExtents | None = None
) -> Iterator[Range]:
    """Image ranges of `(path, size, inode number or 0)` files, in their order, from
    `known` extents where it has the inode, else FIEMAP; unmappable files are skipped.
    FIEMAP opens only regular files, a PathBelow (walked_files) only below its root."""
    learnt = known.of(source) if known is not None else {}
    for path, size, number in files:
        extents = learnt.get(number) if number else None
        if extents is None:
            try:
                extents = file_extents(path)
            except (NoFiemap, OSError) as exc:
                log.debug("no extents for %s: %s", path, exc)
                continue
        yield from to_image(extents, source.partition_start, size)


def batched(
    ranges: Iterable[Range], n: int = RANGES_PER_MESSAGE, max_bytes: int = 1 << 62
) -> Iterator[list[Range]]:
    """Messages of at most `n` ranges, sent once they hold `max_bytes`."""
    batch: list[Range] = []
    size = 0
    for r in ranges:
        batch.append(r)
        size += r[1] - r[0]
        if len(batch) >= n or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class NotOurDaemon(OSError):
    """The plan socket is held by a process of another user."""


def connect(mountpoint: str, timeout_s: float = PLAN_TIMEOUT_S) -> socket.socket:
    """A connection to the daemon of `mountpoint`, whose peer is root or our own user;
    every later send and receive has `timeout_s`. OSError (NotOurDaemon) otherwise."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(min(timeout_s, CONNECT_TIMEOUT_S))
        sock.connect(socket_address(mountpoint))
        uid = peer_uid(sock)
        if uid not in (0, os.getuid()):
            raise NotOurDaemon(
                f"the plan socket of {mountpoint} is held by uid {uid}, not by root or by us"
            )
        sock.settimeout(timeout_s)
    except OSError:
        sock.close()
        raise
    return sock


class PlanSession:
    """One connection to a mount daemon, carrying one plan for one image.

    The socket's name can be bound by any local user before the daemon does, so the peer
    must be root or our own user; every connect, send and receive has a deadline, so a
    daemon that hangs costs the plan, not the restore."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reply = sock.makefile("rb")

    @classmethod
    def open(
        cls, source: ImageSource, mode: str, timeout_s: float = PLAN_TIMEOUT_S
    ) -> "PlanSession | None":
        try:
            sock = connect(source.mountpoint, timeout_s)
        except NotOurDaemon as exc:
            log.warning("no read plan: %s", exc)
            return None
        except OSError as exc:
            log.info("no read plan: the daemon of %s does not answer: %s", source.mountpoint, exc)
            return None
        try:
            sock.sendall(encode({"image": source.image, "mode": mode}))
        except OSError as exc:
            log.info("no read plan: the daemon of %s does not answer: %s", source.mountpoint, exc)
            sock.close()
            return None
        return cls(sock)

    def send(self, ranges: Iterable[Range]) -> int:
        """Send ranges merged over small gaps, then the end mark; returns bytes planned.
        A daemon that stops taking them (it refused the plan, or hangs) ends the sending
        early: its reply, if any, says why."""
        total = 0
        try:
            for batch in batched(
                merge(ranges, MERGE_GAP_BYTES, MERGE_MAX_BYTES), SEND_RANGES, MERGE_MAX_BYTES
            ):
                self.sock.sendall(encode({"ranges": batch}))
                total += sum(end - start for start, end in batch)
            self.sock.sendall(encode({"end": True}))
        except OSError as exc:
            log.info("read plan: the daemon stopped taking it: %s", exc)
        return total

    def replies(self) -> Iterator[dict[str, object]]:
        """The daemon's replies, checked (channel.check_reply); a reply that breaks the
        protocol, or none within the deadline, ends them with a made-up final reply
        whose error says so."""
        try:
            while line := self.reply.readline(MAX_LINE_BYTES + 1):
                try:
                    reply = check_reply(decode(line.rstrip(b"\n")))
                except ChannelError as exc:
                    yield _failed(f"a malformed reply from the daemon: {exc}")
                    return
                yield reply
        except TimeoutError:
            yield _failed(f"the daemon did not answer for {self.sock.gettimeout():g}s")
        except OSError as exc:
            yield _failed(f"the connection to the daemon failed: {exc.strerror or exc}")

    def close(self) -> None:
        with contextlib.suppress(OSError):  # also wakes a thread blocked in sendall
            self.sock.shutdown(socket.SHUT_RDWR)
        self.reply.close()
        self.sock.close()


def _failed(error: str) -> dict[str, object]:
    return {"fetched": 0, "total": 0, "done": True, "error": error}


class RestorePlan:
    """Streams a restore's plan from a thread, so copying starts at once; closing the
    connection when the restore ends tells the daemon to stop prefetching."""

    def __init__(self, session: PlanSession, ranges: Iterable[Range]) -> None:
        self.session = session
        self.planned_bytes = 0
        self.thread = threading.Thread(target=self._send, args=(ranges,), daemon=True)
        self.thread.start()

    def _send(self, ranges: Iterable[Range]) -> None:
        with contextlib.suppress(OSError):  # the daemon went away: plain readahead then
            self.planned_bytes = self.session.send(ranges)

    def close(self) -> None:
        self.session.close()
        self.thread.join()


def start_restore_plan(
    root: str,
    files: list[tuple[str, int, int]],
    map_now: bool = False,
    known: KnownExtents | None = None,
) -> RestorePlan | None:
    """Plan `files` (path under `root`, size, inode number; in copying order), or None
    when no plan applies. With `map_now`, the files are mapped before this returns
    (see start_tree_plan)."""
    source = source_of(root)
    session = PlanSession.open(source, "restore") if source else None
    if source is None or session is None:
        return None
    ranges = image_ranges(source, files, known)
    return RestorePlan(session, list(ranges) if map_now else ranges)


def walked_files(root: str, walked: metaprefetch.Walked) -> list[tuple[str, int, int]]:
    """(path, size, inode number) of every regular file a metadata walk from `root`
    found, in inode order. The names come from the image, and root opens these paths:
    one that would not stay below `root` ("/", "..", NUL...) is left out, and the rest
    are PathBelow `root`, which FIEMAP opens without following a symlink or leaving."""
    files: list[tuple[str, int, int]] = []
    for number, found in sorted(walked.files.items()):
        rel = os.fsdecode(found.rel)
        if safe_rel(rel):
            files.append((PathBelow(root, rel), found.size, number))
    if len(files) < len(walked.files):
        log.warning("%s: left %d files with unsafe names out of the read plan", root,
                    len(walked.files) - len(files))  # fmt: skip
    return files


def start_tree_plan(
    root: str, walked: metaprefetch.Walked, known: KnownExtents
) -> RestorePlan | None:
    """Plan every regular file a metadata walk from `root` found (its extents in `known`),
    in inode order: the order `restore` copies a tree in, so the data flows while restore
    still walks. Mapped before the restore's threads start: mapped alongside them, in a
    thread of the same process, it would hold the GIL they all wait for."""
    return start_restore_plan(root, walked_files(root, walked), map_now=True, known=known)


def warm(
    source: ImageSource,
    files: list[tuple[str, int, int]],
    on_progress: Callable[[int, int], None],
    known: KnownExtents | None = None,
) -> tuple[int, int, str | None]:
    """Fetch the extents of `files` ((path, size, inode number or 0), as for
    image_ranges) into the daemon's cache, sorted by offset; returns (bytes fetched,
    bytes planned, error or None)."""
    session = PlanSession.open(source, "warm")
    if session is None:
        return 0, 0, f"the backupfs daemon of {source.mountpoint} does not answer"
    try:
        ranges = sorted(image_ranges(source, files, known))
        total = session.send(ranges)
        for reply in session.replies():
            fetched, total = int(reply["fetched"]), int(reply["total"])  # type: ignore[call-overload]
            on_progress(fetched, total)
            if reply.get("done"):
                error = reply.get("error")
                return fetched, total, None if error is None else str(error)
        return 0, total, "the daemon closed the connection"
    finally:
        session.close()


def prefetch_metadata(
    path: str, sel: metaprefetch.Selection = None, known: KnownExtents | None = None
) -> metaprefetch.Walked | None:
    """Read the directories and inodes under `path` (all, or those `sel` names) in parallel
    rounds, when `path` lies in an attached ext2/3/4; None when it does not. The extents
    of the files it read go into `known`, for the plan that follows."""
    source = source_of(path)
    if source is None or not source.fstype.startswith("ext"):
        return None
    image = os.path.join(source.mountpoint, source.image)
    start = os.lstat(path).st_ino
    walked = metaprefetch.prefetch(image, source.partition_start, [(start, sel)])
    if known is not None:
        known.add(source, walked)
    log.info("metadata of %s: %d directories, %d inodes, %d bytes in %d rounds", path,
             walked.directories, walked.inodes, walked.bytes_read, walked.rounds)  # fmt: skip
    return walked
