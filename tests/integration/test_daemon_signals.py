"""SIGHUP, log rotation and a dead mount with a file still open, on a real mount."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from backupfs.errors import EXIT_ERROR
from tests.integration.conftest import SMALL, Store
from tests.support.mounting import mounted, run_cli, start_foreground, stop
from tests.support.system import is_mounted

DISK = next(iter(SMALL))


def test_sighup_unmounts_cleanly(store: Store, mnt: Path) -> None:
    proc = start_foreground(store.url, mnt)
    try:
        assert (mnt / DISK).stat().st_size == SMALL[DISK]
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=20) == 0
        assert not is_mounted(mnt)  # unmounted, not left dead
    finally:
        stop(proc, mnt)


def test_log_file_follows_logrotate(store: Store, mnt: Path, tmp_path: Path) -> None:
    log = tmp_path / "backupfs.log"
    with mounted(store.url, mnt, f"log_file={log}"):
        assert "mounted" in log.read_text()
        log.rename(tmp_path / "backupfs.log.1")  # what logrotate does before postrotate
    assert "unmounted" in log.read_text()  # the daemon wrote its last line to a new file
    assert "unmounted" not in (tmp_path / "backupfs.log.1").read_text()


def test_a_dead_mount_with_an_open_file_is_explained_and_cleared(store: Store, mnt: Path) -> None:
    proc = start_foreground(store.url, mnt)
    fd = os.open(mnt / DISK, os.O_RDONLY)
    try:
        proc.kill()
        proc.wait(timeout=20)
        assert is_mounted(mnt)  # dead, never an empty directory

        umount = run_cli("umount", str(mnt))
        assert umount.returncode == EXIT_ERROR, umount
        assert umount.stderr == (
            f"backupfs: {mnt} is a dead backupfs mount (its daemon is gone), held open by "
            f"{os.getpid()} ({Path('/proc/self/comm').read_text().strip()}): close those "
            f"files, or `backupfs umount -l {mnt}` detaches it now and frees it when they "
            "close\n"
        )
        again = run_cli("mount", store.url, str(mnt))
        assert again.returncode == EXIT_ERROR, again
        assert again.stderr == (
            f"backupfs: mountpoint {mnt} is a dead backupfs mount (its daemon is gone): "
            f"`backupfs umount {mnt}` clears it\n"
        )
        lazy = run_cli("umount", "-l", str(mnt))
        assert lazy.returncode == 0, lazy.stderr
        assert not is_mounted(mnt)
    finally:
        with contextlib.suppress(OSError):  # FUSE's flush on close: ENOTCONN, the daemon is gone
            os.close(fd)
        stop(proc, mnt)
