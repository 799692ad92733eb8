"""What a restore is asked to do and what it did: options, counters, the progress line."""

import sys
import threading
import time
from dataclasses import dataclass, field

from backupfs.restore.durability import FlushResult
from backupfs.restore.walk import ScanCount
from backupfs.units import human, plural


@dataclass(frozen=True)
class RestoreOptions:
    jobs: int = 0  # readers; 0: four, or one per clone when there are more
    writers: int = 4
    flush: bool = True
    existing: str = "refuse"  # refuse | overwrite | skip
    progress: bool = False
    read_plan: bool = True  # tell the mount daemon what will be read (readplan.py)
    no_special: bool = False  # no setuid/setgid, no security.capability, no device nodes


@dataclass
class Special:
    """Restored entries that carry privilege when restored as root: files with setuid or
    setgid bits, files with file capabilities (security.capability), device nodes."""

    setid: int = 0
    capabilities: int = 0
    devices: int = 0

    def any(self) -> bool:
        return bool(self.setid or self.capabilities or self.devices)

    def words(self) -> str:
        return (f"{plural(self.setid, 'setuid/setgid file')}, "
                f"{plural(self.capabilities, 'file')} with capabilities, "
                f"{plural(self.devices, 'device node')}")  # fmt: skip

    def as_dict(self) -> dict[str, int]:
        return {"setuid_setgid": self.setid, "capabilities": self.capabilities,
                "device_nodes": self.devices}  # fmt: skip


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
    no_special: bool = False
    special: Special = field(default_factory=Special)  # restored with their privilege
    left_out: Special = field(default_factory=Special)  # what --no-special dropped
    devices_skipped: list[str] = field(default_factory=list)  # by --no-special
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def done(self, size: int) -> None:
        with self.lock:
            self.files += 1
            self.bytes += size

    def fail(self, path: str, exc: BaseException) -> None:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        with self.lock:
            self.failed.append((path, text))

    def privileged(self, setid: bool, capabilities: bool, device: bool, kept: bool) -> None:
        """Count one restored entry with setuid/setgid bits, capabilities or a device
        node; with kept False, what it had was left out (--no-special)."""
        with self.lock:
            counts = self.special if kept else self.left_out
            counts.setid += setid
            counts.capabilities += capabilities
            counts.devices += device

    def skip_device(self, path: str) -> None:
        with self.lock:
            self.left_out.devices += 1
            self.devices_skipped.append(path)

    def special_lines(self) -> list[str]:
        """What the summary says about privileged entries: restored as in the backup, or
        left out with --no-special (each skipped device node named)."""
        lines = []
        if self.special.any():
            lines.append(f"special: restored {self.special.words()} "
                         "(--no-special leaves them out)")  # fmt: skip
        if self.no_special and self.left_out.any():
            lines.append(f"special: left out (--no-special): {self.left_out.words()}")
        lines += [f"skipped device node: {p}" for p in sorted(self.devices_skipped)]
        return lines

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
            "failed": [{"path": p, "error": e} for p, e in sorted(self.failed)],
            "special": self.special.as_dict(),
            "no_special": self.no_special,
            "left_out": self.left_out.as_dict(),
            "skipped_device_nodes": sorted(self.devices_skipped),
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
                f"{human(self.out.bytes)} of {human(self.total_bytes)}  "
                f"{human(rate)}/s  ETA {eta} ")  # fmt: skip

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


class ScanProgress:
    """`scanning: N dirs, M files` on a terminal while the sources are walked, so a large
    tree does not look hung before the copy starts; `count` is updated by the walk."""

    def __init__(self, count: "ScanCount", enabled: bool) -> None:
        self.count, self.enabled = count, enabled
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _line(self) -> str:
        return f"\rscanning: {self.count.dirs} dirs, {self.count.files} files "

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            sys.stderr.write(self._line())
            sys.stderr.flush()

    def __enter__(self) -> "ScanProgress":
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()
            sys.stderr.write(self._line() + "\n")
