"""`backupfs restore`: a reader/writer pipeline that copies files out of a backup, spreads
readers over the attachment's loop clones, and makes the result durable with one syncfs
per target filesystem.

Readers take batches of files (ordered by inode, roughly the on-disk order) from a work
queue; each reads through its own clone. Small files are read whole and handed to the
writers in batches through a queue bounded in size; a large file is streamed by its
reader straight into its temporary file, one chunk at a time. So memory stays bounded:
the write queue, plus one chunk or batch per reader.
"""

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable

from backupfs.plan import readplan
from backupfs.restore import copying
from backupfs.restore.durability import Target
from backupfs.restore.outcome import Outcome, RestoreOptions
from backupfs.restore.walk import Entry, SourcePlan

log = logging.getLogger(__name__)

SMALL_FILE_BYTES = 1 << 20
BATCH_BYTES = 4 << 20
BATCH_FILES = 256
WRITE_QUEUE_BATCHES = 16  # x BATCH_BYTES of read data waiting for writers, at most
_POLL_S = 0.1  # how often a waiting reader or writer looks whether the restore stopped


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
        started_plan: readplan.RestorePlan | None = None,
        known: readplan.KnownExtents | None = None,
    ) -> None:
        self.plan, self.opts, self.target, self.out = plan, opts, target, out
        self.started_plan = started_plan  # a read plan already under way for these files
        self.known = known  # extents the metadata walk read from the inodes
        self.is_root = os.geteuid() == 0
        # Set when the restore is interrupted (SIGINT, SIGTERM): readers and writers finish
        # the file in hand (a streamed one gives up between chunks) and return.
        self.stop = threading.Event()
        self.work: queue.SimpleQueue[list[Entry]] = queue.SimpleQueue()
        self.written: queue.Queue[list[tuple[Entry, str, bytes]] | None] = queue.Queue(
            WRITE_QUEUE_BATCHES
        )

    def final(self, entry: Entry) -> str:
        return os.path.join(self.plan.dest, entry.dest_rel)

    def _record(self, path: str) -> None:
        if not self.target.uses_syncfs:
            with self.out.lock:
                self.target.paths.append(path)

    def _guard(self, entry: Entry, action: Callable[..., object], *args: object) -> bool:
        """Run one step for one entry; a failure is recorded and the restore goes on."""
        try:
            action(*args)
        except OSError as exc:
            self.out.fail(entry.dest_rel or ".", exc)
            return False
        self._record(self.final(entry))
        return True

    def reader(self, index: int) -> None:
        with contextlib.suppress(copying.Stopped):
            self._read_batches(self.plan.roots[index % len(self.plan.roots)])

    def _read_batches(self, root: str) -> None:
        while not self.stop.is_set():
            try:
                batch = self.work.get_nowait()
            except queue.Empty:
                return
            ready: list[tuple[Entry, str, bytes]] = []
            for entry in batch:
                if self.stop.is_set():
                    return
                src = os.path.join(root, entry.rel)
                if entry.st.st_size > SMALL_FILE_BYTES:  # streamed by this thread
                    final = self.final(entry)
                    args = (final, None, src, entry.st, self.is_root, self.stop)
                    if self._guard(entry, copying.write_file, *args):
                        self.out.done(entry.st.st_size)
                    continue
                try:
                    ready.append((entry, src, copying.read_small(src, entry.st)))
                except OSError as exc:
                    self.out.fail(entry.dest_rel, exc)
            if ready:
                self._hand_over(ready)

    def _hand_over(self, ready: list[tuple[Entry, str, bytes]] | None) -> None:
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
                final = self.final(entry)
                if self._guard(entry, copying.write_file, final, data, src, entry.st, self.is_root):
                    self.out.done(entry.st.st_size)

    def _todo(self) -> list[Entry]:
        todo = []
        for entry in self.plan.files:
            final = self.final(entry)
            if self.opts.existing == "skip" and os.path.lexists(final):
                self.out.skipped += 1
            elif self.opts.existing != "overwrite" and copying.is_complete(final, entry.st):
                self.out.skipped += 1
                self._record(final)
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
        todo = self._todo()
        for batch in _batches(todo):
            self.work.put(batch)
        plan = self.started_plan or self._start_plan(todo)  # the same order as the batches
        try:
            self._run_threads()
        finally:
            if plan is not None:
                plan.close()
                self.out.planned_bytes += plan.planned_bytes

    def _run_threads(self) -> None:
        readers = self.opts.jobs or max(4, len(self.plan.roots))
        writer_threads = [threading.Thread(target=self.writer) for _ in range(self.opts.writers)]
        reader_threads = [threading.Thread(target=self.reader, args=(i,)) for i in range(readers)]
        for t in writer_threads + reader_threads:
            t.start()
        try:
            for t in reader_threads:
                t.join()
            for _ in writer_threads:
                self._hand_over(None)
        except BaseException:  # KeyboardInterrupt: stop, then let every thread end
            self.stop.set()
            raise
        finally:
            for t in writer_threads + reader_threads:
                t.join()

    def run(self) -> None:
        root_src = self.plan.roots[0]
        for entry in sorted(self.plan.dirs, key=lambda e: e.rel.count(os.sep)):
            final = self.final(entry)
            if self._guard(entry, os.makedirs, final, 0o700, True):
                copying.remove_stale_tmp(final)
        # Symlinks, fifos and device nodes need no data: they are made beside the copying.
        others = threading.Thread(target=self._make_others, args=(root_src,))
        others.start()
        try:
            self.copy_files()
        except BaseException:
            self.stop.set()
            raise
        finally:
            others.join()
        for entry, first in self.plan.links:
            first_final = os.path.join(self.plan.dest, first)
            self._guard(entry, copying.make_link, self.final(entry), first_final)
        for entry in sorted(self.plan.dirs, key=lambda e: -e.rel.count(os.sep)):
            self._guard(entry, self._dir_metadata, entry, root_src)

    def _make_others(self, root_src: str) -> None:
        for entry in self.plan.others:
            if self.stop.is_set():
                return
            final, src = self.final(entry), os.path.join(root_src, entry.rel)
            if self.opts.existing == "skip" and os.path.lexists(final):
                continue
            self._guard(entry, copying.make_other, final, src, entry.st, self.is_root)

    def _dir_metadata(self, entry: Entry, root_src: str) -> None:
        final, src = self.final(entry), os.path.join(root_src, entry.rel)
        fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            copying.apply_metadata(fd, src, entry.st, self.is_root)
        finally:
            os.close(fd)
