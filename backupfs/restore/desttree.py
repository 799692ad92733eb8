"""DEST as restore writes it: one descriptor of DEST, opened once, and every directory
under it reached from there without following a symlink, so nothing in DEST (a symlink an
earlier restore left, one already there with --overwrite or --skip-existing, one a local
user swaps in while the restore runs) can send a write outside it.

A directory is opened with openat2(2) beneath DEST with RESOLVE_NO_SYMLINKS where the
kernel has it, else one component at a time with O_NOFOLLOW from its parent's descriptor.
Descriptors are cached per directory (least recently used out, `cache_size()` at most
when none is in use), so a file costs no extra open; every write then names one component
relative to its directory's descriptor.

A directory that cannot be used (a symlink, not a directory, gone, no permission) is
recorded: the first caller to meet it gets `Blocked` (to report it, once), every later one
and everything under it `Skipped`.

Threads: any thread may lease a directory (`with tree.dir(rel) as fd`); the cache and
the failure record are guarded by one lock, and a leased descriptor is never closed under
its user. `made` and `existed` are written by the main thread's directory pass only,
before the copying threads start.
"""

import errno
import os
import resource
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from backupfs.linux import openat2
from backupfs.restore.durability import fsync_fd

CACHE_DIRS = 4096  # at most; less where RLIMIT_NOFILE is low (cache_size())
NOT_FOLLOWED = "a symlink in DEST, not followed"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RESOLVE = openat2.RESOLVE_BENEATH | openat2.RESOLVE_NO_SYMLINKS | openat2.RESOLVE_NO_MAGICLINKS


class DestError(OSError):
    """A directory of DEST that cannot be used; `rel` is its path relative to DEST."""

    def __init__(self, err: int, reason: str, rel: str) -> None:
        super().__init__(err, reason)
        self.rel = rel


class Blocked(DestError):
    """Met for the first time: the caller reports it."""


class Skipped(DestError):
    """Already reported (this directory, or one it lies in)."""


def join(base: str, rel: str) -> str:
    """`base/rel` for paths relative to DEST, either of which may be "" (DEST itself)."""
    return f"{base}/{rel}" if base and rel else base or rel


def cache_size() -> int:
    """Directory descriptors to keep: half of what the process may open (the copying
    threads need a few more each), within [64, CACHE_DIRS]."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return CACHE_DIRS if soft == resource.RLIM_INFINITY else max(64, min(CACHE_DIRS, soft // 2))


@dataclass
class _Slot:
    fd: int
    refs: int = 0


class DestTree:
    def __init__(
        self, root_fd: int, use_openat2: bool | None = None, capacity: int | None = None
    ) -> None:
        self.root = root_fd
        self.use_openat2 = openat2.supported(root_fd) if use_openat2 is None else use_openat2
        self.capacity = cache_size() if capacity is None else capacity
        self.failed: dict[str, str] = {}  # rel -> why it cannot be used
        self.made: set[str] = set()  # directories this restore created (empty when made)
        self.existed: set[str] = set()  # directories that were there before
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()

    @classmethod
    def open(
        cls, path: str, use_openat2: bool | None = None, capacity: int | None = None
    ) -> "DestTree":
        """DEST itself, as the caller named it (its own path may hold symlinks)."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(fd, use_openat2, capacity)

    def close(self) -> None:
        self.reset()
        os.close(self.root)

    def reset(self) -> None:
        """Close every cached descriptor not in use: the next use of a directory resolves
        it again, as DEST/<rel> is then."""
        with self._lock:
            for rel in [r for r, s in self._slots.items() if s.refs == 0]:
                os.close(self._slots.pop(rel).fd)

    @contextmanager
    def dir(self, rel: str) -> Iterator[int]:
        """A descriptor of the directory DEST/rel, reached without following symlinks."""
        fd = self._acquire(rel)
        try:
            yield fd
        finally:
            self._release(rel)

    def _acquire(self, rel: str) -> int:
        if not rel:
            return self.root
        with self._lock:
            slot = self._slots.get(rel)
            if slot is not None:
                slot.refs += 1
                self._slots.move_to_end(rel)
                return slot.fd
            self._check_failed(rel)
        if self.use_openat2:
            try:
                fd = openat2.openat2(self.root, rel, DIR_FLAGS, resolve=RESOLVE)
            except OSError:
                pass  # find which component fails, and why, one at a time
            else:
                return self._insert(rel, fd)
        return self._walk_down(rel)

    def _walk_down(self, rel: str) -> int:
        """Open DEST/rel one component at a time with O_NOFOLLOW, from its deepest cached
        ancestor down, caching each directory on the way."""
        parts = rel.split("/")
        depth, fd = 0, self.root
        with self._lock:
            for i in range(len(parts) - 1, 0, -1):
                slot = self._slots.get("/".join(parts[:i]))
                if slot is not None:
                    slot.refs += 1
                    depth, fd = i, slot.fd
                    break
        while True:
            here, name = "/".join(parts[:depth]), parts[depth]
            sub = join(here, name)
            try:
                child = self._insert(sub, os.open(name, DIR_FLAGS, dir_fd=fd))
            except OSError as exc:
                failure = self._failure(sub, fd, name, exc)
                self._release(here)
                raise failure from None
            self._release(here)
            depth, fd = depth + 1, child
            if depth == len(parts):
                return child

    def _insert(self, rel: str, fd: int) -> int:
        """Cache a descriptor just opened and hold it (another thread may have been first)."""
        with self._lock:
            slot = self._slots.get(rel)
            if slot is None:
                slot = self._slots[rel] = _Slot(fd)
            else:  # another thread opened it meanwhile
                os.close(fd)
            slot.refs += 1
            self._evict()
            return slot.fd

    def _release(self, rel: str) -> None:
        if rel:
            with self._lock:
                self._slots[rel].refs -= 1
                self._evict()

    def _evict(self) -> None:
        """Close least recently used descriptors nobody holds (the lock is held)."""
        if len(self._slots) <= self.capacity:
            return
        idle = [r for r, s in self._slots.items() if s.refs == 0]
        for rel in idle[: len(self._slots) - self.capacity]:
            os.close(self._slots.pop(rel).fd)

    def _check_failed(self, rel: str) -> None:
        """Skipped when rel or a directory it lies in was recorded as failed (lock held)."""
        if not self.failed:
            return
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if prefix in self.failed:
                raise Skipped(errno.ENOENT, self.failed[prefix], prefix)

    def under_failed(self, rel: str) -> bool:
        with self._lock:
            try:
                self._check_failed(rel)
            except Skipped:
                return True
        return False

    def _failure(self, rel: str, parent_fd: int, name: str, exc: OSError) -> DestError:
        """Record that DEST/rel cannot be used (its parent can); say why in plain words."""
        err, reason = exc.errno or errno.EIO, exc.strerror or str(exc)
        if err in (errno.ELOOP, errno.ENOTDIR):
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except OSError:
                pass
            else:
                if stat.S_ISLNK(st.st_mode):
                    err, reason = errno.ELOOP, NOT_FOLLOWED
                elif not stat.S_ISDIR(st.st_mode):
                    err, reason = errno.ENOTDIR, os.strerror(errno.ENOTDIR)
        with self._lock:
            try:
                self._check_failed(rel)
            except Skipped as skipped:
                return skipped
            self.failed[rel] = reason
        return Blocked(err, reason, rel)

    def mkdir(self, rel: str, mode: int = 0o700) -> bool:
        """Make the directory DEST/rel, or check the one there is a real directory; True
        when this call made it."""
        parent, name = os.path.split(rel)
        with self.dir(parent) as parent_fd:
            try:
                os.mkdir(name, mode, dir_fd=parent_fd)
                made = True
            except FileExistsError:
                made = False
            except OSError as exc:
                raise self._failure(rel, parent_fd, name, exc) from None
        with self.dir(rel):  # opened without following: a symlink there is Blocked
            (self.made if made else self.existed).add(rel)
        return made

    def lstat(self, rel: str) -> os.stat_result | None:
        """DEST/rel itself (a symlink is not followed), None when there is nothing."""
        parent, name = os.path.split(rel)
        with self.dir(parent) as parent_fd:
            try:
                return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None

    def open_file(self, rel: str, flags: int) -> int:
        """DEST/rel opened with `flags` (plus O_NOFOLLOW), no symlink on the way."""
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if not rel:
            return os.open(".", flags, dir_fd=self.root)
        if self.use_openat2:
            return openat2.openat2(self.root, rel, flags, resolve=RESOLVE)
        parent, name = os.path.split(rel)
        with self.dir(parent) as parent_fd:
            return os.open(name, flags, dir_fd=parent_fd)

    def fsync(self, rel: str) -> None:
        """For targets where syncfs does not do (durability.py)."""
        fd = self.open_file(rel, os.O_RDONLY | os.O_NONBLOCK)
        try:
            fsync_fd(fd)
        finally:
            os.close(fd)
