"""A large file copied in pieces by several readers at once, into one temporary file.

Through an attachment, each clone root is its own loop device, served by its own stream
of the mount daemon; one reader keeps one of them busy. So a file larger than SPLIT_BYTES
is posted on the `Board`, and idle readers on other clone roots copy parts of it too,
each through its own descriptor of the source opened on its own root. Every part is
written at its own offsets into the one temporary file (copy_file_range or pwrite with
explicit offsets: fastcopy.py). Only data is copied: holes are found with
SEEK_DATA/SEEK_HOLE and stay holes.

Each worker copies a contiguous span, PIECE_BYTES at a time; a worker joining takes a
span nobody has yet, else the second half of the largest span left (aligned to
PIECE_BYTES). So each loop device and daemon stream sees one sequential read, and the
copy's blocks are allocated in long runs. At most WORKERS_PER_ROOT workers per root
copy one file: two sequential streams of one file interleaved on one loop device read
slower than one (bench figures in docs/benchmarks.md, "Durable restore versus cp"); a
restore from one root (a local directory, an attachment with one clone) is not split.

The reader that took the file (its owner) created the temporary file and alone finishes
it: it waits until no other reader is inside a piece (they write through its descriptor,
which must not be closed under them), then either lets copying.write_file apply the
metadata and rename, or, when a piece failed or the restore stopped, raises that error,
so the temporary file is removed and the file reported once, as any other failure.

Readers meet on the Board: it hands out work on posted files first (each holds a
temporary file and an owner), then batches. A reader finding neither waits while some
reader owns a file that will be split, since that file is about to be posted; otherwise
it is done.
"""

import errno
import os
import queue
import threading
from dataclasses import dataclass

from backupfs.restore import fastcopy
from backupfs.restore.copying import SRC_FLAGS, Stopped
from backupfs.restore.walk import Entry

SPLIT_BYTES = 64 << 20  # a larger file is copied by readers on several roots at once
PIECE_BYTES = 8 << 20  # a worker's step through its span; spans are cut at multiples of it
WORKERS_PER_ROOT = 1  # readers copying one file through the same clone root, at most
POLL_S = 0.1  # how often a reader waiting for work looks whether the restore stopped


def splits(size: int) -> bool:
    """Whether a file of `size` bytes is posted for other readers (read at call time, so
    tests can change SPLIT_BYTES)."""
    return size > SPLIT_BYTES


def data_ranges(fd: int, size: int, sparse: bool) -> list[tuple[int, int]]:
    """Where the first `size` bytes of the file hold data: all of it, or for a sparse file
    what SEEK_DATA/SEEK_HOLE find (the rest are holes, left unwritten)."""
    if not sparse:
        return [(0, size)] if size else []
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        if pos >= size:
            break
        end = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
        out.append((pos, end))
        pos = end
    return out


@dataclass
class Span:
    """Bytes [pos, end) not copied yet; `held` while a worker walks through it."""

    pos: int
    end: int
    held: bool = False

    def step(self) -> tuple[int, int]:
        """The next piece: up to the next multiple of PIECE_BYTES."""
        start = self.pos
        self.pos = min(self.end, (start // PIECE_BYTES + 1) * PIECE_BYTES)
        return start, self.pos

    @property
    def _middle(self) -> int:
        return (self.pos + self.end) // 2 // PIECE_BYTES * PIECE_BYTES

    @property
    def halvable(self) -> bool:
        """At least a piece left on either side of the middle."""
        return self._middle - self.pos >= PIECE_BYTES and self.end - self._middle >= PIECE_BYTES

    def halve(self) -> "Span | None":
        """The second half, cut off for another worker, if halvable."""
        if not self.halvable:
            return None
        rest, self.end = Span(self._middle, self.end, held=True), self._middle
        return rest


class SplitCopy:
    """One file being copied: the spans left, the roots at work on it, the first error.
    Its state is guarded by the Board's lock."""

    def __init__(self, rel: str, src_fd: int, dst_fd: int, st: os.stat_result) -> None:
        self.rel = rel  # the source, relative to every clone root
        self.st = os.fstat(src_fd)  # what a helper's descriptor must be too
        self.dst = dst_fd
        self.shared = splits(st.st_size)
        ranges = data_ranges(src_fd, st.st_size, st.st_blocks * 512 < st.st_size)
        self.spans = [Span(pos, end) for pos, end in ranges]
        self.route = fastcopy.Route()
        self.roots: dict[str, int] = {}  # root -> workers on it now (owner included)
        self.error: BaseException | None = None

    def wanted(self, root: str) -> bool:
        """Whether a reader on `root` could help now."""
        if self.error is not None or self.roots.get(root, 0) >= WORKERS_PER_ROOT:
            return False
        return any(not s.held or s.halvable for s in self.spans)

    def take(self, mine: Span | None) -> tuple[Span, tuple[int, int]] | None:
        """The next piece for a worker whose span is `mine`: from it while it lasts, then
        a span nobody holds, then half of the largest one left."""
        if mine is not None and mine.pos < mine.end:
            return mine, mine.step()
        if mine is not None:
            self.spans.remove(mine)
        free = next((s for s in self.spans if not s.held), None)
        if free is None:
            largest = max(self.spans, key=lambda s: s.end - s.pos, default=None)
            rest = largest.halve() if largest is not None else None
            if rest is None:
                return None
            self.spans.append(rest)
            free = rest
        free.held = True
        return free, free.step()

    def same_source(self, st: os.stat_result) -> bool:
        return (st.st_ino, st.st_size, st.st_mtime_ns) == (
            self.st.st_ino, self.st.st_size, self.st.st_mtime_ns
        )  # fmt: skip


def _open_source(job: SplitCopy, root: str) -> int:
    """The file on another clone root, checked to be the file the owner opened."""
    fd = os.open(os.path.join(root, job.rel), SRC_FLAGS)
    if not job.same_source(os.fstat(fd)):
        os.close(fd)
        raise OSError(errno.EIO, "source file changed while being read")
    return fd


def _splitting(batch: list[Entry]) -> int:
    return sum(splits(e.st.st_size) for e in batch)


class Board:
    """What readers do next: work on posted files, batches from `work`, or nothing."""

    def __init__(self, work: "queue.SimpleQueue[list[Entry]]", stop: threading.Event) -> None:
        self.work, self.stop = work, stop
        self.cond = threading.Condition()
        self.posted: list[SplitCopy] = []
        self.owners = 0  # readers holding a batch with a file that will be split

    def next(self, root: str) -> SplitCopy | list[Entry] | None:
        """For a reader on `root`: a posted file it can help with, else a batch (`release`
        it when done), else None: nothing left, or the restore stopped."""
        with self.cond:
            while not self.stop.is_set():
                job = next((j for j in self.posted if j.wanted(root)), None)
                if job is not None:
                    return job
                try:
                    batch = self.work.get_nowait()
                except queue.Empty:
                    if not self.owners:
                        return None
                    self.cond.wait(POLL_S)
                    continue
                self.owners += _splitting(batch)
                return batch
        return None

    def release(self, batch: list[Entry]) -> None:
        """A batch from `next` is done: its split files are finished or failed."""
        with self.cond:
            self.owners -= _splitting(batch)
            self.cond.notify_all()

    def run(self, job: SplitCopy, src_fd: int, root: str) -> None:
        """The owner's part, on `root`: post the file (when it splits), copy until nothing
        is left, withdraw it and wait for every reader still at work on it; then raise the
        file's error, or Stopped if the restore stopped before all of it was copied."""
        with self.cond:
            job.roots[root] = 1
            if job.shared:
                self.posted.append(job)
                self.cond.notify_all()
        try:
            self._work(job, src_fd, root)
        finally:
            with self.cond:  # no reader joins now; those at work finish their spans
                if job.shared:
                    self.posted.remove(job)
                while any(job.roots.values()):
                    self.cond.wait()
        if job.error is not None:
            raise job.error
        if job.spans:
            raise Stopped()

    def help(self, job: SplitCopy, root: str) -> None:
        """Copy part of someone else's file through this reader's root. Failing to open
        the source there fails the file, like any read of it."""
        with self.cond:
            if not job.wanted(root):  # another reader on this root came first
                return
            job.roots[root] = job.roots.get(root, 0) + 1
        try:
            fd = _open_source(job, root)
        except OSError as exc:
            self._fail(job, exc)
            self._leave(job, root)
            return
        try:
            self._work(job, fd, root)
        finally:
            os.close(fd)

    def _work(self, job: SplitCopy, src_fd: int, root: str) -> None:
        copier = fastcopy.RangeCopier(src_fd, job.dst, job.route, self.stop)
        mine: Span | None = None
        try:
            while (got := self._take(job, mine)) is not None:
                mine, piece = got
                try:
                    copier.copy(*piece)
                except Exception as exc:  # Stopped, OSError: the file's outcome
                    self._fail(job, exc)
                    return
        except BaseException as exc:
            self._fail(job, exc)
            raise
        finally:
            try:
                copier.close()
            finally:
                self._leave(job, root)

    def _take(self, job: SplitCopy, mine: Span | None) -> tuple[Span, tuple[int, int]] | None:
        with self.cond:
            if job.error is not None or self.stop.is_set():
                return None
            return job.take(mine)

    def _fail(self, job: SplitCopy, exc: BaseException) -> None:
        with self.cond:
            if job.error is None:
                job.error = exc

    def _leave(self, job: SplitCopy, root: str) -> None:
        """A worker is done with the file (the owner waits for every one of them)."""
        with self.cond:
            job.roots[root] -= 1
            self.cond.notify_all()
