"""`backupfs restore`: check DEST, walk the sources, run one pipeline per source with its
read plan, then flush once. An interrupted restore keeps its marker in DEST, so running
the same command again resumes it."""

import contextlib
import json
import os
import time

from backupfs.errors import UsageError, UserError
from backupfs.plan import readplan
from backupfs.restore.durability import Target, flush_target
from backupfs.restore.outcome import Outcome, Progress, RestoreOptions, ScanProgress
from backupfs.restore.pipeline import Pipeline
from backupfs.restore.prefetch import MetadataPrefetch
from backupfs.restore.walk import ScanCount, SourcePlan, walk, walk_files, walk_listed

MARKER = ".backupfs-restore-in-progress"


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _start_dest(plan: SourcePlan, resuming: bool) -> None:
    """Make DEST and mark it in progress; any failure here (read-only, no permission, no
    space, a file on the way) is one line naming DEST, before anything was copied.

    A DEST that will get a source directory's metadata at the end is made 0700 until then
    (nobody reads a half-restored tree); one that gets none (single files, several
    sources, --files-from) is made as `mkdir -p` would, with the umask."""
    gets_metadata = any(e.rel == "" for e in plan.dirs)
    try:
        os.makedirs(plan.dest, 0o700 if gets_metadata else 0o777, exist_ok=True)
        if not resuming:
            with open(os.path.join(plan.dest, MARKER), "w") as f:
                json.dump({"sources": plan.roots}, f)
    except OSError as exc:
        raise UserError(f"{plan.dest}: cannot restore into it: {exc.strerror}") from None


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


def _plans(sources: list[str], dest: str, count: ScanCount) -> list[SourcePlan]:
    """One SRC: DEST is its copy (a directory) or holds it (a file). Several: each lands in
    DEST/<name>; the files among them form one plan, so they are read in parallel."""
    if len(sources) == 1:
        return [walk(sources[0], dest, count)]
    names = [os.path.basename(os.path.normpath(s)) for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"two sources are named {name}: both would be restored to "
                            f"{os.path.join(dest, name)}")  # fmt: skip
    dirs = [s for s in sources if os.path.isdir(s) and not os.path.islink(s)]
    files = [s for s in sources if s not in dirs]  # missing ones fail in walk_files
    named = zip(sources, names, strict=True)
    plans = [walk(s, os.path.join(dest, name), count) for s, name in named if s in dirs]
    return plans + ([walk_files(files, dest)] if files else [])


def restore(
    sources: list[str], dest: str, opts: RestoreOptions, listed: list[str] | None = None
) -> Outcome:
    """`listed`: paths relative to the one SRC (`--files-from`), restored at the same
    relative paths under DEST."""
    started = time.monotonic()  # the summary's time is the whole run's, scan included
    dest = os.path.abspath(dest)
    if listed is not None and (len(sources) != 1 or not os.path.isdir(sources[0])):
        raise UsageError("--files-from takes exactly one SRC, a directory")
    prefetch = MetadataPrefetch(sources, listed, dest) if opts.read_plan else None
    if prefetch is not None:
        prefetch.start()
    count = ScanCount()
    try:
        with ScanProgress(count, opts.progress):
            if listed is not None:
                plans = [walk_listed(sources[0], listed, dest, count)]
            else:
                plans = _plans(sources, dest, count)
    finally:
        early_plan = prefetch.join() if prefetch is not None else None
    known = prefetch.known if prefetch is not None else None
    try:
        return _restore(plans, dest, opts, early_plan, known, started)
    finally:
        if early_plan is not None:
            early_plan.close()


def _restore(
    plans: list[SourcePlan],
    dest: str,
    opts: RestoreOptions,
    early_plan: readplan.RestorePlan | None,
    known: readplan.KnownExtents | None = None,
    started: float | None = None,
) -> Outcome:
    resuming = [_check_dest(p.dest, opts.existing) for p in plans]
    out = Outcome(total_files=sum(len(p.files) for p in plans),
                  total_bytes=sum(p.total_bytes for p in plans))  # fmt: skip
    out.failed.extend(missing for p in plans for missing in p.missing)
    started = time.monotonic() if started is None else started
    # Opened before anything is written: syncfs reports errors since this open.
    try:
        target = Target.open(_existing_ancestor(dest))
    except OSError as exc:
        raise UserError(f"{dest}: cannot restore into it: {exc.strerror}") from None
    try:
        progress = Progress(out, out.total_files, out.total_bytes) if opts.progress else None
        with progress or contextlib.nullcontext():
            for plan, was_resuming in zip(plans, resuming, strict=True):
                _start_dest(plan, was_resuming)
                Pipeline(plan, opts, target, out, early_plan, known).run()
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
