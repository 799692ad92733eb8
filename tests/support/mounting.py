"""Run `backupfs mount -f` as a child with a known PID, wait for READY=1, tear it down."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.system import unmount

BACKUPFS = [sys.executable, "-m", "backupfs"]
READY_TIMEOUT_S = 30.0


def run_cli(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BACKUPFS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,  # type: ignore
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_stats(mountpoint: Path) -> dict[str, Any]:
    """The mount's MOUNTPOINT/.backupfs/stats document."""
    return json.loads((mountpoint / ".backupfs" / "stats").read_text())


def stop(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Unmount (fusermount3 -u, then lazily), let the daemon exit, kill it by its PID if it
    does not; unmount again, in case it died without unmounting."""
    try:
        unmount(mountpoint, fuse=True)
    finally:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    unmount(mountpoint, fuse=True)


def start_foreground(url: str, mountpoint: Path, *options: str) -> subprocess.Popen[bytes]:
    """Start a foreground daemon; return once it reported READY=1 over NOTIFY_SOCKET.

    The socket and the daemon's log are in a short-named directory of their own (a socket
    path has at most 107 bytes), removed on return: the log is read if the daemon fails
    before it is ready; after that, its writes go to the unlinked file."""
    sock_dir = tempfile.mkdtemp(prefix="bfs-notify-")
    try:
        return _start_foreground(url, mountpoint, options, Path(sock_dir))
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


# Options every daemon started here gets unless its caller names them. The integration
# tests' conftest turns the background fill off (fill=off), so that the bytes a test sees
# fetched are what it read; tests/integration/test_fill.py turns it on. Benchmarks keep
# the product's defaults.
DEFAULT_OPTIONS: dict[str, str] = {}


def _with_defaults(options: tuple[str, ...]) -> tuple[str, ...]:
    named = {o.split("=", 1)[0] for item in options for o in item.split(",")}
    extra = tuple(f"{k}={v}" for k, v in DEFAULT_OPTIONS.items() if k not in named)
    return extra + options


def _start_foreground(
    url: str, mountpoint: Path, options: tuple[str, ...], sock_dir: Path
) -> subprocess.Popen[bytes]:
    options = _with_defaults(options)
    sock_path = str(sock_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        opts = ["-o", ",".join(options)] if options else []
        log = open(sock_dir / "log", "wb")  # noqa: SIM115 - lives as long as the daemon
        proc = subprocess.Popen(
            [*BACKUPFS, "mount", "-f", *opts, url, str(mountpoint)],
            env={**os.environ, "NOTIFY_SOCKET": sock_path},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        sock.settimeout(0.2)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    if sock.recv(64).startswith(b"READY=1"):
                        return proc
                if proc.poll() is not None:
                    text = (sock_dir / "log").read_text(errors="replace")
                    raise RuntimeError(f"daemon exited with {proc.returncode}: {text[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError("mount did not become ready")
        except BaseException:
            stop(proc, mountpoint)
            raise


@contextlib.contextmanager
def mounted(url: str, mountpoint: Path, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_foreground(url, mountpoint, *options)
    try:
        yield proc
    finally:
        stop(proc, mountpoint)


def daemon_pids(mountpoint: Path) -> list[int]:
    """PIDs of backupfs daemons serving `mountpoint`, found by their command line."""
    target = str(mountpoint).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                runs_backupfs = any(a.endswith(b"backupfs") for a in argv[:3])
                if runs_backupfs and target in argv:
                    pids.append(int(entry))
    return pids


def kill_daemons(mountpoint: Path) -> None:
    for pid in daemon_pids(mountpoint):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
