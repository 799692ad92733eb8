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
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backupfs.errors import UserError
from backupfs.plan import metaprefetch, readplan
from backupfs.restore import copying
from backupfs.restore.durability import FlushResult, Target, flush_target
from backupfs.restore.walk import Entry, SourcePlan, walk, walk_files, walk_listed

log = logging.getLogger(__name__)

SMALL_FILE_BYTES = 1 << 20
BATCH_BYTES = 4 << 20
BATCH_FILES = 256
WRITE_QUEUE_BATCHES = 16  # x BATCH_BYTES of read data waiting for writers, at most
MARKER = ".backupfs-restore-in-progress"


@dataclass(frozen=True)
class RestoreOptions:
    jobs: int = 0  # readers; 0: four, or one per clone when there are more
    writers: int = 4
    flush: bool = True
    existing: str = "refuse"  # refuse | overwrite | skip
    progress: bool = False
    read_plan: bool = True  # tell the mount daemon what will be read (readplan.py)


@dataclass
class Outcome:
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    total_files: int = 0
    total_bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    flush: list[FlushResult] = field(default_factory=list)
    seconds: float = 0.0
    planned_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def done(self, size: int) -> None:
        with self.lock:
            self.files += 1
            self.bytes += size

    def fail(self, path: str, exc: BaseException) -> None:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        with self.lock:
            self.failed.append((path, text))

    @property
    def ok(self) -> bool:
        return not self.failed and all(r.error is None for r in self.flush)

    def summary(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "files": self.files,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "planned_bytes": self.planned_bytes,
            "failed": [{"path": p, "error": e} for p, e in self.failed],
            "flush": [
                {
                    "path": r.path,
                    "fs": r.fs,
                    "method": r.method,
                    "seconds": round(r.seconds, 3),
                    "error": r.error,
                }
                for r in self.flush
            ],  # fmt: skip
        }


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
    ) -> None:
        self.plan, self.opts, self.target, self.out = plan, opts, target, out
        self.started_plan = started_plan  # a read plan already under way for these files
        self.is_root = os.geteuid() == 0
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
        root = self.plan.roots[index % len(self.plan.roots)]
        while True:
            try:
                batch = self.work.get_nowait()
            except queue.Empty:
                return
            ready: list[tuple[Entry, str, bytes]] = []
            for entry in batch:
                src = os.path.join(root, entry.rel)
                if entry.st.st_size > SMALL_FILE_BYTES:  # streamed by this thread
                    final = self.final(entry)
                    if self._guard(
                        entry, copying.write_file, final, None, src, entry.st, self.is_root
                    ):
                        self.out.done(entry.st.st_size)
                    continue
                try:
                    ready.append((entry, src, copying.read_small(src, entry.st)))
                except OSError as exc:
                    self.out.fail(entry.dest_rel, exc)
            if ready:
                self.written.put(ready)

    def writer(self) -> None:
        while (batch := self.written.get()) is not None:
            for entry, src, data in batch:
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
        return readplan.start_restore_plan(root, files)

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
        for t in reader_threads:
            t.join()
        for _ in writer_threads:
            self.written.put(None)
        for t in writer_threads:
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
        finally:
            others.join()
        for entry, first in self.plan.links:
            first_final = os.path.join(self.plan.dest, first)
            self._guard(entry, copying.make_link, self.final(entry), first_final)
        for entry in sorted(self.plan.dirs, key=lambda e: -e.rel.count(os.sep)):
            self._guard(entry, self._dir_metadata, entry, root_src)

    def _make_others(self, root_src: str) -> None:
        for entry in self.plan.others:
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


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_dest(dest: str, existing: str) -> bool:
    """True when resuming an interrupted restore into dest."""
    if not os.path.lexists(dest):
        return False
    if not os.path.isdir(dest):
        raise UserError(f"{dest}: exists and is not a directory")
    if os.path.exists(os.path.join(dest, MARKER)):
        return True
    if existing == "refuse" and any(os.scandir(dest)):
        raise UserError(
            f"{dest}: not empty (use --skip-existing or --overwrite to restore into it)"
        )
    return False


class Progress:
    """One status line on a terminal: files, bytes, rate, ETA."""

    def __init__(self, out: Outcome, total_files: int, total_bytes: int) -> None:
        self.out, self.total_files, self.total_bytes = out, total_files, total_bytes
        self.stop = threading.Event()
        self.start = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.out.bytes / elapsed
        left = max(self.total_bytes - self.out.bytes, 0)
        eta = f"{left / rate:4.0f}s" if rate > 0 else "   ?"
        return (f"\r{self.out.files + self.out.skipped}/{self.total_files} files  "
                f"{self.out.bytes / 1e6:,.0f}/{self.total_bytes / 1e6:,.0f} MB  "
                f"{rate / 1e6:6.1f} MB/s  ETA {eta} ")  # fmt: skip

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            sys.stderr.write(self._line())
            sys.stderr.flush()

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        sys.stderr.write(self._line() + "\n")


def _plans(sources: list[str], dest: str) -> list[SourcePlan]:
    """One SRC: DEST is its copy (a directory) or holds it (a file). Several: each lands in
    DEST/<name>; the files among them form one plan, so they are read in parallel."""
    if len(sources) == 1:
        return [walk(sources[0], dest)]
    names = [os.path.basename(os.path.normpath(s)) for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"two sources are named {name}: both would be restored to "
                            f"{os.path.join(dest, name)}")  # fmt: skip
    dirs = [s for s in sources if os.path.isdir(s) and not os.path.islink(s)]
    files = [s for s in sources if s not in dirs]  # missing ones fail in walk_files
    named = zip(sources, names, strict=True)
    plans = [walk(s, os.path.join(dest, name)) for s, name in named if s in dirs]
    return plans + ([walk_files(files, dest)] if files else [])


class MetadataPrefetch:
    """The directories and inodes restore's walk will read, fetched in parallel rounds
    (ext2/3/4, readplan.prefetch_metadata). A whole tree is read beside the walk, and
    its data plan starts as soon as the inodes are known, while the walk still runs; a
    --files-from list is read before the walk, which then reads no more than it needs."""

    def __init__(self, sources: list[str], listed: list[str] | None, dest: str) -> None:
        self.dirs = [s for s in sources if os.path.isdir(s) and not os.path.islink(s)]
        self.sel = None if listed is None else metaprefetch.selection(listed)
        # A fresh whole-tree restore copies every file the walk finds, in inode order.
        try:
            fresh = not os.path.lexists(dest) or not any(os.scandir(dest))
        except OSError:  # not a directory, not readable: _check_dest says so
            fresh = False
        self.early = listed is None and len(sources) == 1 and len(self.dirs) == 1 and fresh
        self.plan: readplan.RestorePlan | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        if self.sel is not None:
            self._run()
        elif self.dirs:
            self.thread.start()

    def _run(self) -> None:
        for source in self.dirs:
            try:
                walked = readplan.prefetch_metadata(source, self.sel)
            except OSError as exc:  # the walk reports it
                log.debug("no metadata prefetch for %s: %s", source, exc)
                continue
            if self.early and walked is not None and not walked.errors:
                self.plan = readplan.start_tree_plan(source, walked)

    def join(self) -> readplan.RestorePlan | None:
        """The data plan started early, if any (the caller closes it)."""
        if self.thread.ident is not None:
            self.thread.join()
        return self.plan


def restore(
    sources: list[str], dest: str, opts: RestoreOptions, listed: list[str] | None = None
) -> Outcome:
    """`listed`: paths relative to the one SRC (`--files-from`), restored at the same
    relative paths under DEST."""
    dest = os.path.abspath(dest)
    if listed is not None and (len(sources) != 1 or not os.path.isdir(sources[0])):
        raise UserError("--files-from takes exactly one SRC, a directory")
    prefetch = MetadataPrefetch(sources, listed, dest) if opts.read_plan else None
    if prefetch is not None:
        prefetch.start()
    try:
        if listed is not None:
            plans = [walk_listed(sources[0], listed, dest)]
        else:
            plans = _plans(sources, dest)
    finally:
        early_plan = prefetch.join() if prefetch is not None else None
    try:
        return _restore(plans, dest, opts, early_plan)
    finally:
        if early_plan is not None:
            early_plan.close()


def _restore(
    plans: list[SourcePlan],
    dest: str,
    opts: RestoreOptions,
    early_plan: readplan.RestorePlan | None,
) -> Outcome:
    resuming = [_check_dest(p.dest, opts.existing) for p in plans]
    out = Outcome(total_files=sum(len(p.files) for p in plans),
                  total_bytes=sum(p.total_bytes for p in plans))  # fmt: skip
    started = time.monotonic()
    # Opened before anything is written: syncfs reports errors since this open.
    target = Target.open(_existing_ancestor(dest))
    try:
        progress = Progress(out, out.total_files, out.total_bytes) if opts.progress else None
        with progress or contextlib.nullcontext():
            for plan, was_resuming in zip(plans, resuming, strict=True):
                os.makedirs(plan.dest, 0o700, exist_ok=True)
                marker = os.path.join(plan.dest, MARKER)
                if not was_resuming:
                    with open(marker, "w") as f:
                        json.dump({"sources": plan.roots}, f)
                Pipeline(plan, opts, target, out, early_plan).run()
        markers = sorted({os.path.join(plan.dest, MARKER) for plan in plans})
        if not out.failed:  # complete: nothing to resume (a failed flush puts them back)
            for marker in markers:
                os.unlink(marker)
            for plan in plans:
                for root in (e for e in plan.dirs if e.rel == ""):  # unlink touched its mtime
                    os.utime(plan.dest, ns=(root.st.st_atime_ns, root.st.st_mtime_ns))
        if opts.flush:
            out.flush.append(flush_target(target))
            if out.flush[-1].error is not None:
                for marker in markers:
                    with open(marker, "w"):
                        pass
    finally:
        target.close()
    out.seconds = time.monotonic() - started
    return out
