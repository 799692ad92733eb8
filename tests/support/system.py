"""What is mounted where, how to undo a mount, and syncfs: for tests, fixtures and benchmarks.

Written apart from `backupfs.linux.mountinfo` and `backupfs.restore.durability` on purpose:
the tests use these to check what backupfs did (is the attachment gone? did the flush reach
the disk?), so they must not share a bug with the code under test.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

UNMOUNT_TIMEOUT_S = 60.0
_LAZY_ROUNDS = 8  # mounts stacked on one path come off one per `umount -l`

# sync_file_range(2) flags
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


# --------------------------------------------------------------------------------------------
# /proc/self/mountinfo


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[Mount]:
    """Every mount this process sees, in mountinfo order (a mount on top of another after it)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            out.append(Mount(_unescape(fields[4]), rest[0], _unescape(rest[1])))
    return out


def is_mounted(path: Path | str) -> bool:
    real = os.path.realpath(path)
    return any(m.point == real for m in mounts())


def top_fstype(path: Path | str) -> str | None:
    """The type of the topmost mount at `path`, or None. A dead FUSE mount (stat() fails
    with ENOTCONN) is seen too."""
    real = os.path.realpath(path)
    types = [m.fstype for m in mounts() if m.point == real]
    return types[-1] if types else None


def mount_points_under(root: Path | str) -> list[str]:
    """Mount points at `root` or below it, deepest first (the order to unmount them in)."""
    real = os.path.realpath(root)
    below = real.rstrip("/") + "/"
    points = {m.point for m in mounts() if m.point == real or m.point.startswith(below)}
    return sorted(points, reverse=True)


# --------------------------------------------------------------------------------------------
# unmounting


def _wait(cmd: list[str], timeout_s: float, on_hang: Callable[[], None] | None) -> None:
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        if on_hang is not None:
            on_hang()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:  # still hanging: ours, so ended by its PID
            proc.kill()
            proc.wait()


def unmount(
    path: Path | str,
    *,
    fuse: bool = False,
    attempts: int = 1,
    timeout_s: float = UNMOUNT_TIMEOUT_S,
    on_hang: Callable[[], None] | None = None,
) -> None:
    """Unmount what is mounted at `path`: `fusermount3 -u` (fuse=True) or `umount`, up to
    `attempts` times while something is still mounted there (a mount busy for a moment, a
    process still closing a file), then `umount -l`. Nothing mounted there: nothing to do.

    on_hang runs when one unmount takes longer than `timeout_s` (umount waits, unkillable, on
    writeback through a FUSE daemon that hangs: end that daemon, by its PID); the unmount is
    then waited for once more. Raises RuntimeError if something is still mounted at `path`
    after the lazy unmount.
    """
    polite = ["fusermount3", "-u"] if fuse else ["umount"]
    for attempt in range(attempts):
        if not is_mounted(path):
            return
        if attempt:
            time.sleep(0.1 * attempt)
        _wait([*polite, str(path)], timeout_s, on_hang)
    error = ""
    for _ in range(_LAZY_ROUNDS):
        if not is_mounted(path):
            return
        lazy = subprocess.run(
            ["umount", "-l", str(path)], capture_output=True, text=True, timeout=timeout_s
        )
        error = lazy.stderr.strip()
    if is_mounted(path):
        raise RuntimeError(f"{path}: still mounted after umount -l: {error}")


@contextlib.contextmanager
def tmpfs_mounted(mnt: Path, options: str = "size=1m") -> Iterator[Path]:
    """A tmpfs at `mnt` (made here if absent) with mount `options`, unmounted on exit."""
    mnt.mkdir(exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)]
    subprocess.run(cmd, check=True, timeout=30)
    try:
        yield mnt
    finally:
        unmount(mnt, timeout_s=30)


def unmount_under(root: Path | str, *, timeout_s: float = UNMOUNT_TIMEOUT_S) -> None:
    """Unmount everything at `root` or below it, deepest first."""
    for point in mount_points_under(root):
        unmount(point, timeout_s=timeout_s)


def remove_tree(path: Path | str) -> None:
    """`rm -rf path`, refusing (RuntimeError) while anything is mounted at or below it:
    never delete through a mount that a cleanup failed to undo."""
    left = mount_points_under(path)
    if left:
        raise RuntimeError(f"still mounted below {path}: {', '.join(left)}")
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# flushing


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _call_on(path: Path | str, call: Callable[[int], int]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if call(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def syncfs(path: Path | str) -> None:
    """syncfs(2) on the filesystem holding `path`."""
    _call_on(path, _libc().syncfs)


def write_back(path: Path | str) -> None:
    """Push a file's dirty pages to its disk without any flush: sync_file_range(2) with
    WAIT_BEFORE | WRITE | WAIT_AFTER writes the data, commits no journal, sends no flush."""
    libc = _libc()
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _call_on(path, lambda fd: libc.sync_file_range(fd, 0, 0, _WAIT_BEFORE | _WRITE | _WAIT_AFTER))
