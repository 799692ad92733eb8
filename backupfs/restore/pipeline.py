"""`backupfs restore`: a reader/writer pipeline that copies files out of a backup, spreads
readers over the attachment's loop clones, and makes the result durable with one syncfs
per target filesystem.

Readers take batches of files (ordered by inode, roughly the on-disk order) from a work
queue; each reads through its own clone. Small files are read whole and handed to the
writers in batches through a queue bounded in size; a larger file is copied by its reader
straight into its temporary file, in the kernel where it can be (fastcopy.py), and a
file above pieces.SPLIT_BYTES is cut into pieces that idle readers copy too, each through
its own clone (pieces.py). So memory stays bounded: the write queue, plus one batch, pipe
or buffer per reader.

Every write goes through DEST's directory descriptors (desttree.py): a directory that is
a symlink, or cannot be made, is reported once and nothing under it is written.
"""

import contextlib
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable

from backupfs.plan import readplan
from backupfs.restore import copying, pieces
from backupfs.restore.desttree import DestError, DestTree, Skipped, join
from backupfs.restore.durability import Target
from backupfs.restore.outcome import Outcome, RestoreOptions
from backupfs.restore.walk import Entry, SourcePlan

log = logging.getLogger(__name__)

SMALL_FILE_BYTES = 1 << 20
BATCH_BYTES = 4 << 20
BATCH_FILES = 256
WRITE_QUEUE_BATCHES = 16  # x BATCH_BYTES of read data waiting for writers, at most
_POLL_S = 0.1  # how often a waiting reader or writer looks whether the restore stopped
ReadFile = tuple[bytes, copying.Xattrs]  # a small file's content and xattrs, read whole


def _batches(files: list[Entry]) -> list[list[Entry]]:
    out: list[list[Entry]] = []
    batch: list[Entry] = []
    size = 0
    for entry in files:
        if entry.st.st_size > SMALL_FILE_BYTES:
            out.append([entry])
            continue
        batch.append(entry)
        size += entry.st.st_size
        if size >= BATCH_BYTES or len(batch) >= BATCH_FILES:
            out.append(batch)
            batch, size = [], 0
    if batch:
        out.append(batch)
    return out


class Pipeline:
    def __init__(
        self,
        plan: SourcePlan,
        opts: RestoreOptions,
        target: Target,
        out: Outcome,
        tree: DestTree,
        started_plan: readplan.RestorePlan | None = None,
        known: readplan.KnownExtents | None = None,
    ) -> None:
        self.plan, self.opts, self.target, self.out = plan, opts, target, out
        self.tree = tree
        self.started_plan = started_plan  # a read plan already under way for these files
        self.known = known  # extents the metadata walk read from the inodes
        self.policy = copying.Policy(os.geteuid() == 0, opts.no_special)
        # Set when the restore is interrupted (SIGINT, SIGTERM): readers and writers finish
        # the file in hand (a streamed one gives up between chunks) and return.
        self.stop = threading.Event()
        self.work: queue.SimpleQueue[list[Entry]] = queue.SimpleQueue()
        self.board = pieces.Board(self.work, self.stop)  # batches, and pieces of large files
        self.written: queue.Queue[list[tuple[Entry, str, ReadFile]] | None] = queue.Queue(
            WRITE_QUEUE_BATCHES
        )

    def at(self, entry: Entry) -> str:
        """Where the entry goes, relative to DEST."""
        return join(self.plan.base, entry.dest_rel)

    def _record(self, rel: str) -> None:
        if not self.target.uses_syncfs:
            with self.out.lock:
                self.target.paths.append(rel)

    def _guard(self, rel: str, action: Callable[..., object], *args: object) -> bool:
        """Run one step for one entry; a failure is recorded and the restore goes on. A
        directory of DEST that cannot be used is reported once, by the first to meet it."""
        try:
            action(*args)
        except Skipped:
            return False
        except DestError as exc:
            self.out.fail(exc.rel or ".", exc)
            return False
        except OSError as exc:
            self.out.fail(rel or ".", exc)
            return False
        return True

    def _privileged(self, st: os.stat_result, xattrs: copying.Xattrs) -> None:
        setid = not stat.S_ISDIR(st.st_mode) and bool(st.st_mode & copying.SETID)
        caps = stat.S_ISREG(st.st_mode) and any(n == copying.CAPABILITY for n, _ in xattrs)
        device = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        if setid or caps or device:
            self.out.privileged(setid, caps, device, kept=not self.opts.no_special)

    def _write(self, rel: str, data: ReadFile | copying.Fill, src: str, st: os.stat_result) -> None:
        parent, name = os.path.split(rel)
        with self.tree.dir(parent) as dir_fd:
            xattrs = copying.write_file(dir_fd, name, data, src, st, self.policy)
        self.out.done(st.st_size)
        self._privileged(st, xattrs)
        self._record(rel)

    def reader(self, index: int) -> None:
        with contextlib.suppress(copying.Stopped):
            self._read_batches(self.plan.roots[index % len(self.plan.roots)])

    def _read_batches(self, root: str) -> None:
        while (got := self.board.next(root)) is not None:
            if isinstance(got, pieces.SplitCopy):
                self.board.help(got, root)
                continue
            try:
                self._read_batch(got, root)
            finally:
                self.board.release(got)

    def _read_batch(self, batch: list[Entry], root: str) -> None:
        ready: list[tuple[Entry, str, ReadFile]] = []
        for entry in batch:
            if self.stop.is_set():
                return
            src = os.path.join(root, entry.rel)
            if entry.st.st_size > SMALL_FILE_BYTES:  # copied by this thread (and helpers)
                self._guard(self.at(entry), self._write, self.at(entry),
                            self._fill(entry, root), src, entry.st)  # fmt: skip
                continue
            try:
                ready.append((entry, src, copying.read_small(src, entry.st)))
            except OSError as exc:
                self.out.fail(self.at(entry), exc)
        if ready:
            self._hand_over(ready)

    def _fill(self, entry: Entry, root: str) -> copying.Fill:
        """How a large file's data is copied once write_file opened both ends: by this
        reader, and when it splits, by readers on other roots too (pieces.py)."""

        def fill(src_fd: int, dst_fd: int) -> None:
            job = pieces.SplitCopy(entry.rel, src_fd, dst_fd, entry.st)
            self.board.run(job, src_fd, root)

        return fill

    def _hand_over(self, ready: list[tuple[Entry, str, ReadFile]] | None) -> None:
        """Queue a batch for the writers, giving up when the restore stops."""
        while not self.stop.is_set():
            try:
                self.written.put(ready, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def writer(self) -> None:
        while not self.stop.is_set():
            try:
                batch = self.written.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if batch is None:
                return
            for entry, src, data in batch:
                if self.stop.is_set():
                    return
                self._guard(self.at(entry), self._write, self.at(entry), data, src, entry.st)

    def _there(self, rel: str) -> os.stat_result | None | bool:
        """What DEST/rel is now (None: nothing), or False when it cannot be known: under a
        directory that failed (reported), or not lstat-able (reported here)."""
        parent = os.path.dirname(rel)
        if parent in self.tree.made:  # made empty by this restore: one lstat saved
            return None
        try:
            return self.tree.lstat(rel)
        except Skipped:
            return False
        except DestError as exc:
            self.out.fail(exc.rel, exc)
        except OSError as exc:
            self.out.fail(rel, exc)
        return False

    def _todo(self) -> list[Entry]:
        todo = []
        for entry in self.plan.files:
            rel = self.at(entry)
            if self.tree.failed and self.tree.under_failed(os.path.dirname(rel)):
                continue  # its directory was reported: nothing to read for it
            if self.opts.existing == "overwrite":
                todo.append(entry)
                continue
            have = self._there(rel)
            if have is False:
                continue
            if have is not None and self.opts.existing == "skip":
                self.out.skipped += 1
            elif isinstance(have, os.stat_result) and copying.is_complete(have, entry.st):
                self.out.skipped += 1
                self._record(rel)
            else:
                todo.append(entry)
        return todo

    def _start_plan(self, todo: list[Entry]) -> readplan.RestorePlan | None:
        if not self.opts.read_plan or not todo:
            return None
        root = self.plan.roots[0]
        files = [(os.path.join(root, e.rel), e.st.st_size, e.st.st_ino) for e in todo]
        return readplan.start_restore_plan(root, files, known=self.known)

    def copy_files(self) -> None:
        """Files, and beside them symlinks, fifos and device nodes (which need no data)."""
        todo = self._todo()
        for batch in _batches(todo):
            self.work.put(batch)
        plan = self.started_plan or self._start_plan(todo)  # the same order as the batches
        others = threading.Thread(target=self._make_others, args=(self.plan.roots[0],))
        others.start()
        try:
            self._run_threads()
        except BaseException:
            self.stop.set()
            raise
        finally:
            others.join()
            if plan is not None:
                plan.close()
                self.out.planned_bytes += plan.planned_bytes

    def _run_threads(self) -> None:
        readers = self.opts.jobs or max(4, len(self.plan.roots))
        writer_threads = [threading.Thread(target=self.writer) for _ in range(self.opts.writers)]
        reader_threads = [threading.Thread(target=self.reader, args=(i,)) for i in range(readers)]
        started: list[threading.Thread] = []
        try:
            for t in writer_threads + reader_threads:  # a Ctrl-C may come while they start
                t.start()
                started.append(t)
            for t in reader_threads:
                t.join()
            for _ in writer_threads:
                self._hand_over(None)
        except BaseException:  # KeyboardInterrupt: stop, then let every thread end
            self.stop.set()
            raise
        finally:
            for t in started:  # so each has removed its temporary file before we return
                t.join()

    def make_dirs(self) -> None:
        """Every directory, parents first, made 0700 (its mode comes last); one that was
        there is checked to be a directory, and loses its stale temporary files."""
        base = self.plan.base
        if base in self.tree.existed:
            self._guard(base, self._remove_stale, base)
        for entry in sorted(self.plan.dirs, key=lambda e: e.rel.count(os.sep)):
            rel = self.at(entry)
            if rel == base:
                continue  # made (or found) with DEST, run.py
            try:
                made = self.tree.mkdir(rel)
            except Skipped:
                continue
            except DestError as exc:
                self.out.fail(exc.rel, exc)
                continue
            if not made:
                self._guard(rel, self._remove_stale, rel)

    def _remove_stale(self, rel: str) -> None:
        with self.tree.dir(rel) as dir_fd:
            copying.remove_stale_tmp(dir_fd)

    def run(self) -> None:
        self.make_dirs()
        self.tree.reset()  # from here on each directory is resolved again, as it is now
        self.copy_files()
        for entry, first in self.plan.links:
            rel = self.at(entry)
            if self.opts.existing == "skip" and self._there(rel) is not None:
                continue
            self._guard(rel, self._link, rel, join(self.plan.base, first))
        for entry in sorted(self.plan.dirs, key=lambda e: -e.rel.count(os.sep)):
            rel = self.at(entry)
            if self.opts.existing == "skip" and rel in self.tree.existed:
                continue  # a directory that was there keeps its owner, mode and times
            if self._guard(rel, self._dir_metadata, rel, entry):
                self._record(rel)

    def _link(self, rel: str, first: str) -> None:
        (first_dir, first_name), (parent, name) = os.path.split(first), os.path.split(rel)
        with self.tree.dir(first_dir) as first_fd, self.tree.dir(parent) as dir_fd:
            copying.make_link(first_fd, first_name, first, dir_fd, name)

    def _make_others(self, root_src: str) -> None:
        for entry in self.plan.others:
            if self.stop.is_set():
                return
            rel, src = self.at(entry), os.path.join(root_src, entry.rel)
            device = stat.S_ISCHR(entry.st.st_mode) or stat.S_ISBLK(entry.st.st_mode)
            if self.opts.existing == "skip" and self._there(rel) is not None:
                continue
            if device and self.opts.no_special:
                self.out.skip_device(rel)
                continue
            self._guard(rel, self._other, rel, src, entry.st)

    def _other(self, rel: str, src: str, st: os.stat_result) -> None:
        parent, name = os.path.split(rel)
        with self.tree.dir(parent) as dir_fd:
            xattrs = copying.make_other(dir_fd, name, src, st, self.policy)
        self._privileged(st, xattrs)

    def _dir_metadata(self, rel: str, entry: Entry) -> None:
        src = os.path.join(self.plan.roots[0], entry.rel)
        xattrs = copying.read_xattrs(src)
        with self.tree.dir(rel) as fd:
            copying.apply_metadata(fd, xattrs, entry.st, self.policy)
