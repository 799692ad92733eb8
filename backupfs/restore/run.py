"""`backupfs restore`: check DEST, walk the sources, run one pipeline per source with its
read plan, then flush once. An interrupted restore keeps its marker in DEST, so running
the same command again resumes it.

DEST is the caller's path (symlinks in it are followed, as for any command); it is opened
once, and everything under it is reached from that descriptor without following a
symlink (desttree.py).
"""

import contextlib
import json
import os
import stat
import time

from backupfs.errors import UsageError, UserError
from backupfs.plan import readplan
from backupfs.restore.desttree import NOT_FOLLOWED, DestError, DestTree, join
from backupfs.restore.durability import Target, flush_target
from backupfs.restore.outcome import Outcome, Progress, RestoreOptions, ScanProgress
from backupfs.restore.pipeline import Pipeline
from backupfs.restore.prefetch import MetadataPrefetch
from backupfs.restore.walk import ScanCount, SourcePlan, walk, walk_files, walk_listed

MARKER = ".backupfs-restore-in-progress"
_MARKER_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _gets_metadata(plan: SourcePlan) -> bool:
    """Whether the plan's own directory gets a source directory's metadata at the end."""
    return any(e.rel == "" for e in plan.dirs)


def _open_dest(dest: str, plans: list[SourcePlan]) -> DestTree:
    """Make DEST and open it. A DEST that will get a source directory's metadata at the
    end is made 0700 until then (nobody reads a half-restored tree); one that gets none
    (single files, several sources, --files-from) is made as `mkdir -p` would, with the
    umask."""
    mode = 0o700 if any(not p.base and _gets_metadata(p) for p in plans) else 0o777
    existed = os.path.exists(dest)
    try:
        os.makedirs(dest, mode, exist_ok=True)
        tree = DestTree.open(dest)
    except OSError as exc:
        raise UserError(f"{dest}: cannot restore into it: {exc.strerror}") from None
    (tree.existed if existed else tree.made).add("")
    return tree


def _write_marker(tree: DestTree, plan: SourcePlan) -> None:
    """The marker, a file of our own: whatever has its name is replaced, never opened."""
    with tree.dir(plan.base) as dir_fd:
        try:
            fd = os.open(MARKER, _MARKER_FLAGS, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            os.unlink(MARKER, dir_fd=dir_fd)
            fd = os.open(MARKER, _MARKER_FLAGS, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w") as f:
            json.dump({"sources": plan.roots}, f)


def _start_dest(tree: DestTree, plan: SourcePlan, resuming: bool) -> None:
    """Make the plan's directory (DEST/<name> with several sources) and mark it in
    progress; any failure here (read-only, no permission, no space, a symlink or a file on
    the way) is one line naming it, before anything was copied."""
    try:
        if plan.base:
            tree.mkdir(plan.base, 0o700 if _gets_metadata(plan) else 0o777)
        if not resuming:
            _write_marker(tree, plan)
    except OSError as exc:
        raise UserError(f"{plan.dest}: cannot restore into it: {exc.strerror}") from None


def _check_dest(dest: str, existing: str, inside: bool) -> bool:
    """True when resuming an interrupted restore into dest. `inside`: dest is DEST/<name>
    (several sources), where a symlink is not followed."""
    try:
        st = os.lstat(dest) if inside else os.stat(dest)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise UserError(f"{dest}: cannot restore into it: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{dest}: {NOT_FOLLOWED}")
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{dest}: exists and is not a directory")
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(os.path.join(dest, MARKER)).st_mode):
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
    plans = []
    for source, name in zip(sources, names, strict=True):
        if source in dirs:
            plans.append(walk(source, os.path.join(dest, name), count))
            plans[-1].base = name
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
    resuming = [_check_dest(p.dest, opts.existing, bool(p.base)) for p in plans]
    out = Outcome(total_files=sum(len(p.files) for p in plans),
                  total_bytes=sum(p.total_bytes for p in plans),
                  no_special=opts.no_special)  # fmt: skip
    out.failed.extend((join(p.base, rel), why) for p in plans for rel, why in p.failed)
    started = time.monotonic() if started is None else started
    # Opened before anything is written: syncfs reports errors since this open.
    try:
        target = Target.open(_existing_ancestor(dest))
    except OSError as exc:
        raise UserError(f"{dest}: cannot restore into it: {exc.strerror}") from None
    try:
        tree = _open_dest(dest, plans)
        try:
            for plan, was_resuming in zip(plans, resuming, strict=True):
                _start_dest(tree, plan, was_resuming)
            progress = Progress(out, out.total_files, out.total_bytes) if opts.progress else None
            with progress or contextlib.nullcontext():
                for plan in plans:
                    Pipeline(plan, opts, target, out, tree, early_plan, known).run()
            _finish(tree, plans, opts, target, out)
        finally:
            tree.close()
    finally:
        target.close()
    out.seconds = time.monotonic() - started
    return out


def _finish(
    tree: DestTree, plans: list[SourcePlan], opts: RestoreOptions, target: Target, out: Outcome
) -> None:
    """Complete: no marker left (a failed flush puts them back), then the flush."""
    if not out.failed:
        for plan in plans:
            with tree.dir(plan.base) as dir_fd:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(MARKER, dir_fd=dir_fd)
                root = next((e for e in plan.dirs if e.rel == ""), None)
                if root is not None and not (
                    opts.existing == "skip" and plan.base in tree.existed
                ):  # the unlink touched its mtime
                    os.utime(dir_fd, ns=(root.st.st_atime_ns, root.st.st_mtime_ns))
    if opts.flush:
        target.fsync = tree.fsync  # the paths recorded are relative to DEST
        out.flush.append(flush_target(target))
        if out.flush[-1].error is not None:
            for plan in plans:
                with contextlib.suppress(DestError):  # reported already
                    _write_marker(tree, plan)
