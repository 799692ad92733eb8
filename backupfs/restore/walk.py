"""What a restore will do: the source tree walked once, and where its clones are.

A source inside an attachment (`backupfs attach`) has the same relative path on every
loop clone of its partition; readers are spread over those roots.

A directory that cannot be listed, or an entry whose inode cannot be read (EIO from a bad
block, EACCES), does not stop the walk: it is listed in the plan's `failed` and the rest
is walked (the directory itself is still restored, with what could be listed in it).
"""

import os
import stat
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from backupfs.attach import state as attach_state
from backupfs.errors import UserError

SCAN_THREADS = 8


@dataclass
class ScanCount:
    """How far the walk got, for the progress line (written by the walking thread only)."""

    dirs: int = 0
    files: int = 0


@dataclass(frozen=True)
class Entry:
    rel: str  # path relative to the source root ("" for the root itself)
    st: os.stat_result
    out: str = ""  # path relative to the destination, when not `rel`

    @property
    def dest_rel(self) -> str:
        return self.out or self.rel

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.st.st_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.st.st_mode)


@dataclass
class SourcePlan:
    roots: list[str]  # the source on clone 0, 1, ... (one root when not attached)
    dest: str
    base: str = ""  # where `dest` is, relative to the restore's DEST ("" for DEST itself)
    dirs: list[Entry] = field(default_factory=list)
    files: list[Entry] = field(default_factory=list)
    links: list[tuple[Entry, str]] = field(default_factory=list)  # (hardlink, rel of first)
    others: list[Entry] = field(default_factory=list)  # symlinks, fifos, device nodes
    # (rel, why): listed but absent (--files-from), or unreadable during the walk
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(e.st.st_size for e in self.files)


def clone_roots(source: str) -> list[str]:
    """The same path on every clone when `source` lies in an attached partition."""
    where = attach_state.locate(source)
    return [os.path.realpath(source)] if where is None else where.on_every_clone()


def walk(source: str, dest: str, count: ScanCount | None = None) -> SourcePlan:
    """Everything under `source` (a directory, restored as `dest`), or `source` alone (a
    file or link, restored into the directory `dest`)."""
    roots = clone_roots(source)
    try:
        top = os.lstat(roots[0])
    except OSError as exc:
        raise UserError(f"{source}: {exc.strerror}") from None
    if stat.S_ISDIR(top.st_mode):
        plan, start = SourcePlan(roots, dest), Entry("", top)
    else:
        name = os.path.basename(roots[0])
        plan, start = SourcePlan([os.path.dirname(r) for r in roots], dest), Entry(name, top)
    _descend(plan, [start], count)
    unlisted = dict(plan.failed).get("") if start.is_dir else None
    if unlisted is not None and len(plan.dirs) == 1 and not plan.files + plan.others:
        raise UserError(f"{source}: {unlisted}")  # SRC itself cannot be read: nothing to do
    return plan


def _lstat(plan: SourcePlan, rel: str, shown: str) -> os.stat_result:
    try:
        return os.lstat(os.path.join(plan.roots[0], rel))
    except OSError as exc:
        raise UserError(f"{shown}: {exc.strerror}") from None


def walk_listed(
    source: str, rels: list[str], dest: str, count: ScanCount | None = None
) -> SourcePlan:
    """The paths `rels` under the directory `source` (directories with all they hold),
    restored at the same relative paths under `dest`, like `rsync -a --files-from`: the
    directories on the way are restored too, with their metadata, but not their other
    contents."""
    plan = SourcePlan(clone_roots(source), dest)
    starts, implied = [], set()
    for line in dict.fromkeys(rels):  # once each, in the order given
        rel = os.path.normpath(line.strip("/"))  # a leading / means SOURCE, as for rsync
        if rel in (".", "") or rel.startswith("../") or rel == "..":
            raise UserError(f"--files-from: {line!r} is not a path inside {source}")
        try:  # a listed path that is not there is reported, the others restored (rsync)
            st = os.lstat(os.path.join(plan.roots[0], rel))
        except OSError as exc:
            plan.failed.append((rel, exc.strerror or str(exc)))
            continue
        parent = os.path.dirname(rel)
        while parent and parent not in implied:
            implied.add(parent)
            plan.dirs.append(Entry(parent, _lstat(plan, parent, os.path.join(source, parent))))
            parent = os.path.dirname(parent)
        starts.append(Entry(rel, st))
    return _descend(plan, starts, count)


Failures = list[tuple[str, str]]


def _scan(root: str, rel: str) -> tuple[list[Entry] | None, Failures]:
    """A directory's entries with their lstat, sorted by name (None when it cannot be
    listed at all), and those that failed: (rel, why)."""
    children: list[os.DirEntry[str]] = []
    failed: Failures = []
    try:
        with os.scandir(os.path.join(root, rel)) as it:
            for child in it:
                children.append(child)
    except OSError as exc:  # a bad directory block may fail the listing half way
        failed.append((rel, exc.strerror or str(exc)))
        if not children:
            return None, failed
    entries = []
    for child in sorted(children, key=lambda d: d.name):
        child_rel = os.path.join(rel, child.name)
        try:
            entries.append(Entry(child_rel, child.stat(follow_symlinks=False)))
        except OSError as exc:  # its inode cannot be read
            failed.append((child_rel, exc.strerror or str(exc)))
    return entries, failed


def _scan_all(
    roots: list[str], starts: list[Entry], count: ScanCount | None = None
) -> tuple[dict[str, list[Entry]], Failures]:
    """Every directory under `starts`, scanned by parallel threads spread over the clones:
    each lstat may wait for a fetch, and many waits in flight hide the round trips. What
    cannot be read is returned beside, sorted by path."""
    found: dict[str, list[Entry]] = {}
    failed: Failures = []
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        todo: dict[Future[tuple[list[Entry] | None, Failures]], str] = {}
        turn = 0

        def submit(rel: str) -> None:
            nonlocal turn
            todo[pool.submit(_scan, roots[turn % len(roots)], rel)] = rel
            turn += 1

        for entry in starts:
            if entry.is_dir:
                submit(entry.rel)
        while todo:
            done, _ = wait(todo, return_when=FIRST_COMPLETED)
            for future in done:
                rel = todo.pop(future)
                entries, errors = future.result()
                failed.extend(errors)
                if entries is None:
                    continue
                found[rel] = entries
                for child in entries:
                    if child.is_dir:
                        submit(child.rel)
                if count is not None:
                    count.dirs += 1
                    count.files += sum(not c.is_dir for c in entries)
    return found, sorted(failed)


def scan_paths(source: str, files: bool) -> list[str]:
    """`source` and every directory (and with `files`, regular file) below it, as paths on
    clone 0; scanned as the restore walk is, so the scan itself warms the metadata."""
    roots = clone_roots(source)
    scanned, failed = _scan_all(roots, [Entry("", os.lstat(roots[0]))])
    if failed:
        rel, why = failed[0]
        raise UserError(f"{os.path.join(roots[0], rel)}: {why}")
    wanted = [e.rel for children in scanned.values() for e in children
              if e.is_dir or (files and e.is_file)]  # fmt: skip
    return [roots[0]] + [os.path.join(roots[0], rel) for rel in wanted]


def _descend(plan: SourcePlan, starts: list[Entry], count: ScanCount | None) -> SourcePlan:
    scanned, failed = _scan_all(plan.roots, starts, count)
    plan.failed.extend(failed)
    # Clones are one filesystem on several devices: hard links are found by clone 0's device.
    devices = {os.stat(root).st_dev: os.stat(plan.roots[0]).st_dev for root in plan.roots}
    first_of: dict[tuple[int, int], str] = {}
    stack = list(reversed(starts))
    seen: set[str] = set()  # a listed path may also lie under a listed directory
    while stack:
        entry = stack.pop()
        if entry.rel in seen:
            continue
        seen.add(entry.rel)
        if entry.is_dir:
            plan.dirs.append(entry)
            stack.extend(scanned.get(entry.rel, ()))  # nothing when it could not be listed
        elif entry.is_file and entry.st.st_nlink > 1:
            key = (devices.get(entry.st.st_dev, entry.st.st_dev), entry.st.st_ino)
            if key in first_of:
                plan.links.append((entry, first_of[key]))
            else:
                first_of[key] = entry.rel
                plan.files.append(entry)
        elif entry.is_file:
            plan.files.append(entry)
        else:
            plan.others.append(entry)
    plan.files.sort(key=lambda e: e.st.st_ino)  # roughly the on-disk order: fewer seeks
    return plan


def walk_files(sources: list[str], dest: str) -> SourcePlan:
    """Several files (or links) restored into the directory `dest` under their own names,
    as one plan: read through the clones of their common directory, in inode order."""
    real = [os.path.realpath(os.path.dirname(os.path.abspath(s))) for s in sources]
    common = os.path.commonpath(real)
    plan = SourcePlan(clone_roots(common), dest)
    for source, parent in zip(sources, real, strict=True):
        name = os.path.basename(os.path.normpath(source))
        rel = os.path.relpath(os.path.join(parent, name), common)
        entry = Entry(rel, _lstat(plan, rel, source), out=name)
        (plan.files if entry.is_file else plan.others).append(entry)
    plan.files.sort(key=lambda e: e.st.st_ino)
    return plan
