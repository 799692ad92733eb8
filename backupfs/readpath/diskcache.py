"""A persistent, content-addressed store of verified blocks, shared across mounts.

Entry `root/v1/<first byte hex>/<SHA-256 hex of the content>`; another format would sit
beside `v1/`. Blocking calls for worker threads; no trio. Nothing on disk is trusted: `get`
re-hashes and drops a mismatch, and every failure is a miss or a skipped write, never an
exception, so the cache can cost speed but never correctness.

Several processes may share a root: entries are renamed into place whole, and every step
tolerates a file another process just removed. Recency is the mtime, set on write and hit.
`bytes_used` is this process's estimate; past `max_bytes`, a scan of the directory (which
counts other processes' entries too) evicts least recently used files down to 90%. A
process also rescans after writing an eighth of `max_bytes` since its last scan, so
mounts that share the directory overshoot it by at most that much each.

Whoever can write in the directory can plant files, symlinks and subdirectories in it, so
the root and `v1/` must be ours and writable by no one else when root uses them (another
user's files would otherwise steer root's writes and deletions), and an entry is read
only up to `max_entry_bytes`: a planted huge file is dropped, never read whole.
"""

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from backupfs.errors import UserError
from backupfs.store.manifest import MAX_BLOCK_SIZE

log = logging.getLogger(__name__)

_FORMAT_DIR = "v1"
_EVICT_TO = 0.9  # evict down to this fraction of max_bytes, so not on every put
_WRITE_WARNING_INTERVAL_S = 600.0
_STALE_TEMP_NS = 3600 * 10**9  # a temporary file this old was left by a crashed writer
_TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# backupfs block cache\n"
MAX_ENTRY_BYTES = MAX_BLOCK_SIZE  # an entry is one store block (a digest's), never larger


@dataclass
class DiskCacheStats:
    """Counters of one DiskCache (this process only); `misses` include `corrupt`."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    write_errors: int = 0
    evicted: int = 0


class DiskCache:
    def __init__(self, root: Path, max_bytes: int, max_entry_bytes: int = MAX_ENTRY_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_bytes, max_entry_bytes)
        self.stats = DiskCacheStats()
        self._dir = root / _FORMAT_DIR
        self._lock = threading.Lock()  # guards bytes_used, stats and _warned
        self._evicting = threading.Lock()
        self._warned: set[str] = set()
        self._written_since_scan = 0  # bytes this process wrote since it last scanned
        self._last_write_warning = -_WRITE_WARNING_INTERVAL_S
        _check_root(root)
        try:
            self._dir.mkdir(mode=0o700, exist_ok=True)
            st = self._dir.lstat()
            if not stat.S_ISDIR(st.st_mode):
                raise UserError(f"cache_dir {self._dir} is not a directory")
            if st.st_uid != os.geteuid():
                raise UserError(f"cache_dir {self._dir} is owned by another user")
            if st.st_mode & 0o022:
                raise UserError(f"cache_dir {self._dir} is writable by group or others")
            if not (root / "CACHEDIR.TAG").exists():  # tells backup tools to skip it
                (root / "CACHEDIR.TAG").write_text(_TAG)
        except OSError as e:
            raise UserError(f"cache_dir {root}: {e.strerror or e}") from None
        found = self._scan()
        self.bytes_used = sum(size for _, size, _ in found)
        if self.bytes_used > max_bytes:  # e.g. a smaller cache_dir_size than last time
            self._evict(found)

    def get(self, digest: bytes) -> bytes | None:
        """The block whose SHA-256 is `digest`, or None if absent or damaged."""
        path = self._path(digest)
        data = self._read_verified(path, digest)
        with self._lock:
            if data is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
        if data is not None:
            _touch(path)
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        """Store a verified block under its SHA-256 `digest`; a no-op if already there."""
        path = self._path(digest)
        if len(data) > self.max_entry_bytes or _touch(path):
            return
        tmp = None
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with open(fd, "wb") as f:
                f.write(data)
                now = time.time_ns()
                os.utime(f.fileno(), ns=(now, now))
            os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                _unlink(tmp)
            self._write_failed(e)
            return
        with self._lock:
            self.bytes_used += len(data)
            self._written_since_scan += len(data)
            over = self.bytes_used > self.max_bytes
            due = self._written_since_scan >= self.max_bytes // 8
        if (over or due) and self._evicting.acquire(blocking=False):
            try:
                with self._lock:
                    self._written_since_scan = 0
                self._evict(self._scan())
            finally:
                self._evicting.release()

    def _read_verified(self, path: Path, digest: bytes) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO can't hang
        except FileNotFoundError:
            return None
        except OSError as e:
            self._drop(path, f"unreadable ({e.strerror or e})")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > self.max_entry_bytes:
                kind = "oversized" if stat.S_ISREG(st.st_mode) else "not a regular file"
                self._drop(path, f"{kind} ({st.st_size} bytes)")
                return None
            with open(fd, "rb", closefd=False) as f:
                data = f.read(self.max_entry_bytes + 1)  # bounded even if it grows meanwhile
        except OSError as e:
            self._drop(path, f"unreadable ({e.strerror or e})")
            return None
        finally:
            os.close(fd)
        if hashlib.sha256(data).digest() != digest:
            self._drop(path, f"corrupt ({len(data)} bytes, wrong SHA-256)")
            return None
        return data

    def _path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self._dir / name[:2] / name

    def _scan(self) -> list[tuple[int, int, str]]:
        """(mtime_ns, size, path) of every entry and stale temporary file (a crashed
        writer's). Other names are left alone: eviction deletes only what it could write."""
        found = []
        stale_ns = time.time_ns() - _STALE_TEMP_NS
        for subdir in _list(self._dir):
            if len(subdir.name) != 2 or not subdir.is_dir(follow_symlinks=False):
                continue
            for entry in _list(subdir.path):
                temp = entry.name.startswith(".tmp-")
                if not temp and not (len(entry.name) == 64 and entry.name.startswith(subdir.name)):
                    continue
                with contextlib.suppress(OSError):  # removed by another process since listed
                    st = entry.stat(follow_symlinks=False)
                    if not temp or st.st_mtime_ns < stale_ns:
                        found.append((st.st_mtime_ns, st.st_size, entry.path))
        return found

    def _evict(self, found: list[tuple[int, int, str]]) -> None:
        """Remove the least recently used of `found` (a fresh scan, so other processes'
        entries count too) until the total is down to 90% of max_bytes, if it is over."""
        found.sort(key=lambda e: e[0])
        total = sum(size for _, size, _ in found)
        target = int(self.max_bytes * _EVICT_TO) if total > self.max_bytes else total
        evicted = 0
        for _, size, path in found:
            if total <= target:
                break
            _unlink(path)  # gone already (another evictor) counts as gone
            total -= size
            evicted += 1
        with self._lock:
            self.bytes_used = total
            self.stats.evicted += evicted

    def _drop(self, path: Path, why: str) -> None:
        _unlink(path)
        with self._lock:
            self.stats.corrupt += 1
            first = path.name not in self._warned
            self._warned.add(path.name)
        if first:
            log.warning("disk cache: dropped %s entry %s", why, path)

    def _write_failed(self, e: OSError) -> None:
        now = time.monotonic()
        with self._lock:
            self.stats.write_errors += 1
            count = self.stats.write_errors
            due = now - self._last_write_warning >= _WRITE_WARNING_INTERVAL_S
            if due:
                self._last_write_warning = now
        if due:
            log.warning(
                "disk cache: cannot write to %s (%s; %d write errors so far); "
                "still reading from it",
                self._dir,
                e.strerror or e,
                count,
            )


def _check_root(root: Path) -> None:
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = root.stat()
    except FileExistsError:
        raise UserError(f"cache_dir {root} is not a directory") from None
    except OSError as e:
        raise UserError(f"cache_dir {root}: {e.strerror or e}") from None
    if st.st_mode & 0o022 and st.st_uid != os.geteuid():
        raise UserError(f"cache_dir {root} is writable by other users and not owned by you")
    if os.geteuid() == 0 and st.st_uid != 0:  # its owner could steer root's writes
        raise UserError(f"cache_dir {root} is owned by uid {st.st_uid}: root uses only its own")
    if os.geteuid() == 0 and st.st_mode & 0o022:
        raise UserError(f"cache_dir {root} is writable by group or others; chmod go-w it")
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"cache_dir {root} is not writable")


def _touch(path: Path) -> bool:
    """Mark `path` recently used (best effort); False only if it does not exist."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now), follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:  # exists, but e.g. a read-only cache cannot record the use
        pass
    return True


def _list(path: str | Path) -> list[os.DirEntry[str]]:
    """A directory's entries; none if it cannot be read (or was just removed)."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


def _unlink(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
