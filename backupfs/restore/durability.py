"""Making restored files durable: one syncfs(2) per filesystem, or fsync per file where the
filesystem does not honour syncfs (NFS, CIFS/SMB, FUSE). Shared by `restore` and `flush`.

syncfs reports writeback errors that happened since the descriptor it is given was
opened (Linux 5.8+), so `Target.open` is called before any data is written.
"""

import errno
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from backupfs.linux.fs import NO_SYNCFS, fs_name, fs_type, syncfs


def fsync_fd(fd: int) -> None:
    """fsync, where a fifo or socket (EINVAL: nothing to write back) is not an error."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL or stat.S_ISREG(os.fstat(fd).st_mode):
            raise


def fsync_path(path: str) -> None:
    """O_NONBLOCK: a fifo among the paths must not hang the flush."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


@dataclass
class Target:
    """One filesystem being written to, with a descriptor opened before the writes."""

    path: str
    dev: int
    f_type: int
    fd: int
    paths: list[str] = field(default_factory=list)  # what to fsync when syncfs won't do
    # how one of `paths` is fsynced: restore records paths relative to DEST and opens
    # them beneath it (desttree.py), flush takes the paths it is given
    fsync: Callable[[str], None] = fsync_path

    @classmethod
    def open(cls, path: str) -> "Target":
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(path, os.fstat(fd).st_dev, fs_type(path), fd)

    @property
    def uses_syncfs(self) -> bool:
        return self.f_type not in NO_SYNCFS

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class FlushResult:
    path: str
    fs: str
    method: str
    seconds: float
    error: str | None = None

    def line(self) -> str:
        status = f"FAILED: {self.error}" if self.error else f"in {self.seconds:.2f}s"
        return f"{self.path} ({self.fs}): {self.method} {status}"


def flush_target(target: Target, jobs: int = 16) -> FlushResult:
    """syncfs the filesystem, or fsync every recorded path in parallel (files, then dirs)."""
    start = time.monotonic()
    try:
        if target.uses_syncfs:
            syncfs(target.fd)
            method = "syncfs"
        else:
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(target.fsync, target.paths))
            method = f"fsync of {len(target.paths)} files and directories"
    except OSError as exc:
        return FlushResult(target.path, fs_name(target.f_type), "flush", 0.0, str(exc))
    return FlushResult(target.path, fs_name(target.f_type), method, time.monotonic() - start)


def tree_paths(root: str) -> list[str]:
    """Every file and directory under root, deepest first (a directory after its content)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        out.extend(os.path.join(dirpath, n) for n in filenames)
        out.extend(os.path.join(dirpath, n) for n in dirnames)
    if Path(root).is_dir() and not Path(root).is_symlink():
        out.append(root)
    return [p for p in out if not os.path.islink(p)]


def flush_paths(paths: list[str]) -> list[FlushResult]:
    """`backupfs flush PATH...`: one result per filesystem."""
    targets: dict[int, Target] = {}
    for path in paths:
        directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        target = Target.open(directory)
        if target.dev in targets:
            target.close()
            target = targets[target.dev]
        else:
            targets[target.dev] = target
        if not target.uses_syncfs:
            target.paths.extend(tree_paths(path) if os.path.isdir(path) else [path])
    try:
        return [flush_target(t) for t in targets.values()]
    finally:
        for t in targets.values():
            t.close()
