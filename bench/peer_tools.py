"""The peer tools as contenders in the suite, the ways an admin would get files out of a
remote disk image without backupfs: curl+loop (download the whole image, then a loop
device), and rclone, httpdirfs and nbdkit (nbdfuse + nbdkit's curl plugin), FUSE
filesystems that show the remote image as a file with a loop device on it.

Every one of them ends the same way (LoopMounted): partition 1 of the image file is found
with `sfdisk --json` and mounted through one read-only loop device with the options
`backupfs attach` uses. Daemons and curl are stopped by the PID this code started.
"""

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from common import loop_mount, peak_rss_mib
from contender import Contender, Opened, pid_metrics

from tests.support.mounting import stop as stop_fuse_daemon
from tests.support.system import is_mounted

READY_TIMEOUT_S = 60.0


class LoopMounted(Contender):
    """The image file is made available somehow (a FUSE mount, a download); partition 1 is
    found with `sfdisk --json` and mounted through one read-only loop device
    (`losetup --offset --sizelimit`, buffered) with the options `backupfs attach` uses."""

    loop_needs = ("losetup", "sfdisk", "mount", "umount")
    access = "plain"

    def image_file(
        self, url: str, image: str, work: Path, stack: contextlib.ExitStack
    ) -> tuple[Path, Callable[[], tuple[float, float]]]:
        raise NotImplementedError

    def open(self, url: str, image: str, work: Path, stack: contextlib.ExitStack) -> Opened:
        path, metrics = self.image_file(url, image, work, stack)
        root = work / "loopfs"
        loop_mount(path, root, stack)
        return Opened(root, metrics=metrics)


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            children += [int(c) for c in text.split()]
    return children


def fuse_daemon(
    argv: list[str], mountpoint: Path, log: Path, stack: contextlib.ExitStack
) -> subprocess.Popen[bytes]:
    """Start a FUSE daemon in the foreground; return once `mountpoint` is mounted."""
    mountpoint.mkdir(exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    stack.callback(stop_fuse_daemon, proc, mountpoint)  # unmount, then wait/kill by PID
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not is_mounted(mountpoint):
        if proc.poll() is not None:
            raise RuntimeError(
                f"{argv[0]} exited with {proc.returncode}: "
                f"{log.read_text(errors='replace')[-1500:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{argv[0]} did not mount {mountpoint} in {READY_TIMEOUT_S} s")
        time.sleep(0.05)
    return proc


class FuseFile(LoopMounted):
    """A FUSE filesystem that shows the remote image as a file; the loop device sits on it."""

    def mount_argv(self, url: str, image: str, mnt: Path, work: Path) -> tuple[list[str], Path]:
        """The daemon's command line and where the image file appears in the mount."""
        raise NotImplementedError

    def image_file(
        self, url: str, image: str, work: Path, stack: contextlib.ExitStack
    ) -> tuple[Path, Callable[[], tuple[float, float]]]:
        mnt = work / "fuse"
        argv, path = self.mount_argv(url, image, mnt, work)
        proc = fuse_daemon(argv, mnt, work / f"{self.name}.log", stack)
        return path, pid_metrics(lambda: [proc.pid, *child_pids(proc.pid)])


class Rclone(FuseFile):
    """`rclone mount` with its http backend. --vfs-cache-mode full: the mode rclone's docs
    give for files read at random offsets (a loop device is exactly that); fetched ranges are
    kept in a sparse cache file, so a block read twice is fetched once, and seeks do not
    restart the HTTP stream. Cold: a fresh, empty --cache-dir per run."""

    needs = ("rclone", "fusermount3", *LoopMounted.loop_needs)

    def __init__(self, name: str = "rclone", cache_mode: str = "full") -> None:
        self.name, self.cache_mode = name, cache_mode

    def describe(self) -> str:
        return (
            f"rclone mount :http: MNT --http-url URL --read-only --vfs-cache-mode "
            f"{self.cache_mode} --cache-dir WORK; losetup -r --offset --sizelimit "
            "MNT/IMAGE; mount -o ro,noload"
        )

    def mount_argv(self, url: str, image: str, mnt: Path, work: Path) -> tuple[list[str], Path]:
        argv = [
            "rclone",
            "mount",
            ":http:",
            str(mnt),
            "--http-url",
            url,
            "--read-only",
            "--vfs-cache-mode",
            self.cache_mode,
            "--cache-dir",
            str(work / "rclone-cache"),
            "--config",
            str(work / "rclone.conf"),
        ]
        return argv, mnt / image


class Httpdirfs(FuseFile):
    """httpdirfs with --no-range-check, which it needs because nginx's 206 replies carry no
    Accept-Ranges. No --cache: with it, httpdirfs 1.2.5 dies on the first close of the image
    ("Cache_free: could not destroy w_lock!", upstream issue #174), so each FUSE read is one
    ranged GET."""

    needs = ("httpdirfs", *LoopMounted.loop_needs)
    name = "httpdirfs"

    def describe(self) -> str:
        return (
            "httpdirfs -f --no-range-check URL MNT; losetup -r --offset --sizelimit "
            "MNT/IMAGE; mount -o ro,noload"
        )

    def mount_argv(self, url: str, image: str, mnt: Path, work: Path) -> tuple[list[str], Path]:
        return ["httpdirfs", "-f", "--no-range-check", url, str(mnt)], mnt / image


class Nbdfuse(FuseFile):
    """nbdkit's curl plugin serving the image over NBD to nbdfuse, which shows it as a file.
    nbdkit 1.32's curl plugin serializes requests (one ranged GET at a time); its readahead
    filter cannot prefetch with such a plugin, so none is added. CPU and RSS are nbdfuse's
    plus nbdkit's."""

    needs = ("nbdfuse", "nbdkit", *LoopMounted.loop_needs)
    name = "nbdkit"

    def describe(self) -> str:
        return (
            "nbdfuse -r MNT/disk.img [ nbdkit --exit-with-parent -r curl URL/IMAGE ]; "
            "losetup -r --offset --sizelimit MNT/disk.img; mount -o ro,noload"
        )

    def mount_argv(self, url: str, image: str, mnt: Path, work: Path) -> tuple[list[str], Path]:
        argv = [
            "nbdfuse",
            "-r",
            str(mnt / "disk.img"),
            "[",
            "nbdkit",
            "--exit-with-parent",
            "-r",
            "curl",
            url + image,
            "]",
        ]
        return argv, mnt / "disk.img"


class Download(LoopMounted):
    """`curl` downloads the whole image to the local disk first (into the work directory,
    deleted after the run); then the loop device sits on the local file. CPU and RSS are
    curl's."""

    needs = ("curl", *LoopMounted.loop_needs)
    name = "curl+loop"
    access = "download"

    def describe(self) -> str:
        return (
            "curl -sSf -o disk.img URL/IMAGE; losetup -r --offset --sizelimit disk.img; "
            "mount -o ro,noload"
        )

    def image_file(
        self, url: str, image: str, work: Path, stack: contextlib.ExitStack
    ) -> tuple[Path, Callable[[], tuple[float, float]]]:
        path = work / "download" / "disk.img"
        path.parent.mkdir(exist_ok=True)
        stack.callback(path.unlink, missing_ok=True)
        proc = subprocess.Popen(
            ["curl", "-sSf", "--max-time", "7200", "-o", str(path), url + image],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        stack.callback(_kill_unreaped, proc)
        # CPU time from wait4; peak RSS from VmHWM while it runs (wait4's ru_maxrss would
        # include this Python process, which curl was forked from, in Linux's accounting)
        rss_mib = 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            with contextlib.suppress(OSError):
                rss_mib = max(rss_mib, peak_rss_mib(proc.pid))
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            error = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"curl exited with {proc.returncode}: {error.strip()}")
        cpu = usage.ru_utime + usage.ru_stime
        return path, lambda: (cpu, rss_mib)


def _kill_unreaped(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is None:
        proc.kill()
        proc.wait(timeout=30)
    if proc.stderr:
        proc.stderr.close()
