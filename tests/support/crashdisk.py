"""A disk with a volatile write cache that can lose power: proves whether data is durable.

``CrashDisk``, a helper for tests: mkfs.ext4 on DURABLE_FILE, start the FUSE daemon of
`tests/support/crashdisk_daemon.py` over it (it serves DURABLE_FILE as ``disk.img`` and keeps
every write in a volatile buffer until FSYNC; its docstring says exactly what it does), put a
loop device over ``disk.img``, mount ext4 on it, let the test write, cut the power, tear down
without anything reaching DURABLE_FILE, then loop-mount DURABLE_FILE itself the way a reboot
would (the kernel replays the ext4 journal) and let the test look at what survived.

How the kernel's durability requests reach the daemon
-----------------------------------------------------
ext4 orders its journal with REQ_PREFLUSH / REQ_FUA writes. The loop driver announces a
volatile write cache without FUA, so the block layer turns FUA into a write plus a flush,
and the loop driver serves every flush with ``vfs_fsync()`` on its backing file, which here
is ``disk.img`` on FUSE: the daemon gets FSYNC. Nothing else makes data durable, so what
survives a cut is exactly what the filesystem flushed - the barrier contract of a real disk
with a write cache that loses everything unflushed when the power goes (a real disk may keep
more; keeping nothing unflushed is the harshest legal outcome).

Besides the daemon's own choices (no FUSE writeback cache, FOPEN_DIRECT_IO), the loop device
is set up with ``--direct-io=on``: each bio becomes one direct write to ``disk.img`` in the
loop driver, with no page cache of the backing file between the block layer and the daemon.
With FOPEN_DIRECT_IO a buffered loop would behave the same; ``CrashDisk.loop_dio`` records
what the kernel actually did.

What keeps the "nothing was synced" case deterministic
------------------------------------------------------
The only thing that flushes without being asked is the jbd2 commit timer (ext4 ``commit=``,
5 s by default), so ext4 is mounted with ``commit=600`` and ``noinit_itable`` (and mkfs runs
with ``lazy_itable_init=0,lazy_journal_init=0`` so there is no lazy-init thread writing and
flushing in the background). The kernel's periodic writeback (``vm.dirty_expire_centisecs``,
30 s by default) may push dirty data pages to the daemon, but it sends no flush and the metadata
naming those blocks stays in the uncommitted journal transaction, so they are lost at the cut
all the same. A ``sync()`` from any other process on the machine *does* reach this ext4 and
flush it; the ``fsyncs`` counter (and ``fsyncs_before_cut`` in the cut's stats) lets a test
see that this happened. After the cut, ``umount`` writes back and flushes everything still
dirty - the daemon discards all of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.crashdisk_daemon import CONTROL_NAME, DISK_NAME, READY_LINE
from tests.support.system import is_mounted, unmount

MIB = 1 << 20
_TIMEOUT_S = 60
_READY_TIMEOUT_S = 30.0
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_TIMEOUT_S
    )
    if proc.returncode:
        raise RuntimeError(
            f"{' '.join(cmd)} failed with status {proc.returncode}: "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def _loop_attached(dev: str) -> bool:
    return Path(f"/sys/block/{Path(dev).name}/loop/backing_file").exists()


class CrashDisk:
    """An ext4 filesystem on a disk whose power can be cut. Use as a context manager.

    Layout under `workdir`: ``durable.img`` (DURABLE_FILE), ``fuse/`` (the daemon's mount,
    holding ``disk.img``), ``fs/`` (ext4 over the loop device), ``after/`` (DURABLE_FILE
    loop-mounted after the crash) and ``crashdisk.log`` (the daemon's log)::

        with CrashDisk(tmp_path, 128) as disk:
            fs = disk.mount_fs()          # ext4, rw, commit=600
            ...                           # write, sync or not
            disk.power_cut()              # -> the daemon's counters at the cut
            after = disk.remount_after_crash()
            ...                           # compare what survived
            disk.unmount_after_crash()
            disk.fsck()                   # optional: e2fsck -fn must find it clean
    """

    def __init__(self, workdir: Path, size_mib: int = 256, *, commit_s: int = 600) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.durable = self.workdir / "durable.img"
        self.fuse_dir = self.workdir / "fuse"
        self.fs_dir = self.workdir / "fs"
        self.after_dir = self.workdir / "after"
        self.log_path = self.workdir / "crashdisk.log"
        self.mount_options = f"commit={commit_s},noinit_itable"
        self.loop_dio: bool | None = None  # did the kernel take --direct-io=on?
        self.cut_stats: dict[str, Any] | None = None  # daemon counters just after the cut
        self.final_stats: dict[str, Any] | None = None  # ... and just before it stopped
        self._daemon: subprocess.Popen[str] | None = None
        self._loop: str | None = None
        self._after_loop: str | None = None
        self.durable.unlink(missing_ok=True)
        with open(self.durable, "xb") as f:
            f.truncate(size_mib * MIB)
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                str(self.durable),
            ]  # fmt: skip
        )

    def __enter__(self) -> CrashDisk:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- daemon ------------------------------------------------------------------------------

    def _start_daemon(self) -> None:
        self.fuse_dir.mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._daemon = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.crashdisk_daemon",
                    str(self.durable),
                    str(self.fuse_dir),
                ],  # fmt: skip
                cwd=_REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
            )
        assert self._daemon.stdout is not None
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"crashdisk daemon not ready: {self._log_tail()}")
            ready, _, _ = select.select([self._daemon.stdout], [], [], min(left, 0.5))
            if ready:
                line = self._daemon.stdout.readline()
                if line.strip() == READY_LINE:
                    return
                if not line:
                    self._daemon.wait(timeout=_TIMEOUT_S)
                    raise RuntimeError(
                        f"crashdisk daemon exited with {self._daemon.returncode}: "
                        f"{self._log_tail()}"
                    )

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def _stop_daemon(self) -> None:
        """Unmount the FUSE filesystem so the daemon exits; SIGTERM, then SIGKILL, if not."""
        proc = self._daemon
        if proc is None:
            return
        try:
            if proc.poll() is None and is_mounted(self.fuse_dir):
                subprocess.run(
                    ["fusermount3", "-u", str(self.fuse_dir)],
                    capture_output=True,
                    timeout=_TIMEOUT_S,
                )
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and proc.poll() is None:
                    proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
                    break
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            # the daemon may have died without unmounting
            unmount(self.fuse_dir, fuse=True, timeout_s=_TIMEOUT_S)
            self._daemon = None

    def _kill_daemon(self) -> None:
        """Last resort when something hangs on the FUSE file: end our daemon, by its PID."""
        if self._daemon is not None and self._daemon.poll() is None:
            self._daemon.kill()

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (see crashdisk_daemon.CrashDiskFS.counters)."""
        data = (self.fuse_dir / CONTROL_NAME).read_bytes()
        result: dict[str, Any] = json.loads(data)
        return result

    # -- mounts and loop devices -------------------------------------------------------------

    def _umount(self, mnt: Path) -> None:
        # umount waits (uninterruptibly) on writeback through a daemon that hangs: ending
        # our daemon fails the outstanding FUSE requests, and the umount goes on
        unmount(mnt, attempts=10, timeout_s=_TIMEOUT_S, on_hang=self._kill_daemon)

    @staticmethod
    def _detach(dev: str) -> None:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=_TIMEOUT_S)
        deadline = time.monotonic() + 15
        while _loop_attached(dev):  # still open somewhere: autoclear detaches on last close
            if time.monotonic() > deadline:
                raise RuntimeError(f"loop device {dev} did not detach")
            time.sleep(0.05)

    def mount_fs(self) -> Path:
        """Start the daemon, put a loop device over disk.img, mount ext4 on it; return it."""
        if self._daemon is not None:
            raise RuntimeError("already mounted")
        self._start_daemon()
        image = self.fuse_dir / DISK_NAME
        self._loop = _run(["losetup", "--find", "--show", "--direct-io=on", str(image)]).strip()
        dio = Path(f"/sys/block/{Path(self._loop).name}/loop/dio")
        with contextlib.suppress(OSError):
            self.loop_dio = dio.read_text().strip() == "1"
        self.fs_dir.mkdir(exist_ok=True)
        _run(["mount", "-t", "ext4", "-o", self.mount_options, self._loop, str(self.fs_dir)])
        return self.fs_dir

    def power_cut(self) -> dict[str, Any]:
        """Cut the power, then tear down; return the daemon's counters just after the cut.

        The umount of ext4 and the loop detach that follow write back and flush all that is
        still dirty, and the daemon discards it.
        """
        if self._daemon is None:
            raise RuntimeError("not mounted")
        fd = os.open(self.fuse_dir / CONTROL_NAME, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)
        self.cut_stats = self.stats()
        assert self.cut_stats["cut"], self.cut_stats
        self._teardown_fs()
        return self.cut_stats

    def _teardown_fs(self) -> None:
        try:
            self._umount(self.fs_dir)
            if self._loop is not None:
                self._detach(self._loop)
                self._loop = None
            if self._daemon is not None and self._daemon.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    self.final_stats = self.stats()
        finally:
            self._stop_daemon()

    def remount_after_crash(self) -> Path:
        """Loop-mount DURABLE_FILE itself (ext4 replays its journal, as after a reboot)."""
        if self._daemon is not None:
            raise RuntimeError("the daemon is still running: power_cut() first")
        if self._after_loop is not None:
            raise RuntimeError("already remounted")
        self.after_dir.mkdir(exist_ok=True)
        self._after_loop = _run(["losetup", "--find", "--show", str(self.durable)]).strip()
        _run(["mount", "-t", "ext4", self._after_loop, str(self.after_dir)])
        return self.after_dir

    def unmount_after_crash(self) -> None:
        try:
            self._umount(self.after_dir)
        finally:
            if self._after_loop is not None:
                self._detach(self._after_loop)
                self._after_loop = None

    def fsck(self) -> str:
        """`e2fsck -fn` on DURABLE_FILE (unmounted, journal already replayed); raise if dirty."""
        if self._daemon is not None or self._after_loop is not None:
            raise RuntimeError("unmount first")
        proc = subprocess.run(
            ["e2fsck", "-fn", str(self.durable)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
        )
        if proc.returncode:
            raise RuntimeError(f"e2fsck found problems ({proc.returncode}):\n{proc.stdout}")
        return proc.stdout

    def close(self) -> None:
        """Undo whatever is still set up, in order; raise the first error at the end."""
        errors: list[BaseException] = []
        for step in (self._teardown_fs, self.unmount_after_crash):
            try:
                step()
            except Exception as e:  # go on undoing the rest
                errors.append(e)
        if errors:
            raise errors[0]
