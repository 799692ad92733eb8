"""A disk with a volatile write cache that can lose power: proves whether data is durable.

Two parts:

* A FUSE daemon (pyfuse3 + trio), run as its own process::

      python3 -m tests.support.crashdisk DURABLE_FILE MOUNTPOINT

  It exposes one file, ``MOUNTPOINT/disk.img``, as large as DURABLE_FILE, and prints
  ``READY`` on stdout once it serves requests. It behaves like a disk with a write cache:

  - WRITE puts the data into an in-memory volatile buffer of 4 KiB pages; nothing else.
  - READ returns the newest data: buffered pages first, DURABLE_FILE for the rest.
  - FSYNC on ``disk.img`` (the only durability request the kernel sends for a regular file)
    writes every buffered page to DURABLE_FILE, ``os.fsync``s it and empties the buffer.
  - FLUSH (sent on every ``close()`` of a descriptor) and FSYNCDIR persist nothing: closing a
    file does not make it durable, and the directory holds nothing but the image. Nor does
    unmounting the daemon or its exit (SIGTERM): what was not fsync'd is gone.
  - Power cut: a write to the control file ``MOUNTPOINT/.powercut`` (it is not listed by
    readdir, but can be looked up by name) or SIGUSR1 drops every buffered page; from then
    on writes and fsyncs succeed and keep nothing, so nothing written after the cut reaches
    DURABLE_FILE. Reads then show DURABLE_FILE, i.e. what the disk holds after the reboot.
    The write to ``.powercut`` returns only once the cut is done, so it is synchronous for
    the caller (a signal is not). Reading ``.powercut`` gives counters as JSON.

  SIGTERM/SIGINT or an unmount (``fusermount3 -u``) end the daemon cleanly.

* ``CrashDisk``, a helper for tests: mkfs.ext4 on DURABLE_FILE, start the daemon, put a loop
  device over ``disk.img``, mount ext4 on it, let the test write, cut the power, tear down
  without anything reaching DURABLE_FILE, then loop-mount DURABLE_FILE itself the way a
  reboot would (the kernel replays the ext4 journal) and let the test look at what survived.

How the kernel's durability requests reach the daemon
-----------------------------------------------------
ext4 orders its journal with REQ_PREFLUSH / REQ_FUA writes. The loop driver announces a
volatile write cache without FUA, so the block layer turns FUA into a write plus a flush,
and the loop driver serves every flush with ``vfs_fsync()`` on its backing file, which here
is ``disk.img`` on FUSE: the daemon gets FSYNC. Nothing else makes data durable, so what
survives a cut is exactly what the filesystem flushed - the barrier contract of a real disk
with a write cache that loses everything unflushed when the power goes (a real disk may keep
more; keeping nothing unflushed is the harshest legal outcome).

Choices that keep kernel caches from hiding or reordering writes:

* No FUSE writeback cache. pyfuse3's ``fuse_init`` asks for FUSE_CAP_WRITEBACK_CACHE only if
  ``Operations.enable_writeback_cache`` is true (libfuse 3 does not turn it on by itself); it
  is false here, set explicitly. (It would even be correct - ``fuse_fsync`` writes back and
  waits for dirty pages before it sends FSYNC, and dirty pages left at the cut would only be
  sent after it and be discarded - but without it every write is a request the daemon sees.)
* ``disk.img`` is opened with FOPEN_DIRECT_IO (``FileInfo.direct_io``), so the FUSE inode
  has no page cache at all: no read can be served from pages the daemon has since dropped.
* The loop device is set up with ``--direct-io=on``: each bio becomes one direct write to
  ``disk.img`` in the loop driver, with no page cache of the backing file between the block
  layer and the daemon. With FOPEN_DIRECT_IO a buffered loop would behave the same;
  ``CrashDisk.loop_dio`` records what the kernel actually did.

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

import argparse
import contextlib
import errno
import json
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pyfuse3
import trio

from tests.support.system import is_mounted, unmount

PAGE = 4096
MIB = 1 << 20
DISK_NAME = "disk.img"
CONTROL_NAME = ".powercut"
READY_LINE = "READY"

_ROOT_INO = pyfuse3.ROOT_INODE
_DISK_INO = _ROOT_INO + 1
_CTL_INO = _ROOT_INO + 2
_TIMEOUT_S = 60
_READY_TIMEOUT_S = 30.0
_REPO_ROOT = Path(__file__).resolve().parents[2]

log = logging.getLogger("crashdisk")


# --------------------------------------------------------------------------------------------
# the FUSE daemon


class CrashDiskFS(pyfuse3.Operations):
    """One file backed by DURABLE_FILE plus a volatile page buffer; see the module docstring."""

    enable_writeback_cache = False  # every write must reach us as a WRITE request

    def __init__(self, durable: Path) -> None:
        super().__init__()
        self.fd = os.open(durable, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.pages: dict[int, bytes] = {}  # page number -> content (short only at EOF)
        self.cut = False
        self.counters = {
            "writes": 0,  # WRITE requests on disk.img, before the cut
            "bytes_written": 0,
            "fsyncs": 0,  # FSYNC requests on disk.img, before the cut
            "pages_persisted": 0,
            "flushes": 0,  # FLUSH (close) requests: never persist anything
            "fsyncdirs": 0,
            "fsyncs_before_cut": -1,  # value of "fsyncs" when the power was cut
            "pages_dropped_at_cut": 0,
            "writes_after_cut": 0,  # discarded
            "fsyncs_after_cut": 0,  # discarded
        }
        self.mtime_ns = time.time_ns()

    def close(self) -> None:
        os.close(self.fd)

    # -- the model ---------------------------------------------------------------------------

    def power_cut(self) -> None:
        if self.cut:
            return
        self.cut = True
        self.counters["fsyncs_before_cut"] = self.counters["fsyncs"]
        self.counters["pages_dropped_at_cut"] = len(self.pages)
        self.pages.clear()
        log.info("power cut: dropped %d buffered pages", self.counters["pages_dropped_at_cut"])

    def _page(self, pno: int) -> bytes:
        page = self.pages.get(pno)
        if page is None:
            page = os.pread(self.fd, PAGE, pno * PAGE)
        return page

    def _buffer(self, off: int, buf: bytes) -> None:
        view = memoryview(buf)
        pos, end = off, off + len(buf)
        while pos < end:
            pno, poff = divmod(pos, PAGE)
            n = min(PAGE - poff, end - pos)
            chunk = view[pos - off : pos - off + n]
            if poff == 0 and (n == PAGE or pos + n == self.size):
                self.pages[pno] = bytes(chunk)
            else:
                page = bytearray(self._page(pno))
                page[poff : poff + n] = chunk
                self.pages[pno] = bytes(page)
            pos += n

    def _persist(self) -> None:
        if self.pages:
            run_start, run = -1, bytearray()
            for pno in sorted(self.pages):
                if run and pno * PAGE != run_start + len(run):
                    self._pwrite_all(bytes(run), run_start)
                    run = bytearray()
                if not run:
                    run_start = pno * PAGE
                run += self.pages[pno]
            if run:
                self._pwrite_all(bytes(run), run_start)
            self.counters["pages_persisted"] += len(self.pages)
            self.pages.clear()
        os.fsync(self.fd)

    def _pwrite_all(self, data: bytes, off: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], off + done)

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "cut": self.cut,
            "dirty_pages": len(self.pages),
            "size": self.size,
        }

    # -- FUSE operations ---------------------------------------------------------------------

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        if ino == _ROOT_INO:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.st_size = 0
        elif ino == _DISK_INO:
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_nlink = 1
            attr.st_size = self.size
        elif ino == _CTL_INO:
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_nlink = 1
            attr.st_size = 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_uid = attr.st_gid = 0
        attr.st_blksize = PAGE
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.mtime_ns
        attr.attr_timeout = attr.entry_timeout = 3600.0
        return attr

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != _ROOT_INO:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(_ROOT_INO)
        if name == DISK_NAME.encode():
            return self._attr(_DISK_INO)
        if name == CONTROL_NAME.encode():
            return self._attr(_CTL_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        if fields.update_size and attr.st_size != self._attr(inode).st_size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk does not change its size
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: Any) -> Any:
        if inode != _ROOT_INO:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return _ROOT_INO

    async def readdir(self, fh: Any, start_id: int, token: Any) -> None:
        if start_id < 1:  # .powercut is left out on purpose: the image is the only file
            pyfuse3.readdir_reply(token, DISK_NAME.encode(), self._attr(_DISK_INO), 1)

    async def releasedir(self, fh: Any) -> None:
        return None

    async def fsyncdir(self, fh: Any, datasync: bool) -> None:
        self.counters["fsyncdirs"] += 1  # nothing to persist: the directory never changes

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if inode not in (_DISK_INO, _CTL_INO):
            raise pyfuse3.FUSEError(errno.EISDIR if inode == _ROOT_INO else errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh: Any, off: int, size: int) -> bytes:
        if fh == _CTL_INO:
            text = (json.dumps(self.stats(), sort_keys=True) + "\n").encode()
            return text[off : off + size]
        end = min(off + size, self.size)
        if off >= end:
            return b""
        data = bytearray(os.pread(self.fd, end - off, off))
        if len(data) < end - off:
            data += bytes(end - off - len(data))
        for pno in range(off // PAGE, (end - 1) // PAGE + 1):
            page = self.pages.get(pno)
            if page is None:
                continue
            start = pno * PAGE
            lo, hi = max(off, start), min(end, start + len(page))
            data[lo - off : hi - off] = page[lo - start : hi - start]
        return bytes(data)

    async def write(self, fh: Any, off: int, buf: bytes) -> int:
        if fh == _CTL_INO:
            self.power_cut()
            return len(buf)
        if off >= self.size and buf:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        buf = buf[: self.size - off]
        if self.cut:
            self.counters["writes_after_cut"] += 1
            return len(buf)
        self.counters["writes"] += 1
        self.counters["bytes_written"] += len(buf)
        self._buffer(off, buf)
        return len(buf)

    async def flush(self, fh: Any) -> None:
        self.counters["flushes"] += 1  # close() is not a durability request

    async def fsync(self, fh: Any, datasync: bool) -> None:
        if fh != _DISK_INO:
            return
        if self.cut:
            self.counters["fsyncs_after_cut"] += 1
            return
        self.counters["fsyncs"] += 1
        self._persist()

    async def release(self, fh: Any) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = PAGE
        st.f_blocks = (self.size + PAGE - 1) // PAGE
        st.f_bfree = st.f_bavail = 0
        st.f_files = 2
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st


async def _serve(ops: CrashDiskFS) -> None:
    async def watch_signals(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as sigs:
            task_status.started()
            async for signum in sigs:
                if signum == signal.SIGUSR1:
                    ops.power_cut()
                else:
                    log.info("signal %d: stopping", signum)
                    pyfuse3.terminate()

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        print(READY_LINE, flush=True)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("durable", type=Path, help="the file that survives the power cut")
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s crashdisk %(levelname)s %(message)s",
    )
    ops = CrashDiskFS(args.durable)
    options = set(pyfuse3.default_options) | {"fsname=crashdisk", "subtype=crashdisk"}
    try:
        pyfuse3.init(ops, str(args.mountpoint), options)
        try:
            trio.run(_serve, ops)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        log.info("exiting: %s", json.dumps(ops.stats(), sort_keys=True))
        ops.close()
    return 0


# --------------------------------------------------------------------------------------------
# the helper for tests


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
                    "tests.support.crashdisk",
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
        """The daemon's counters (see CrashDiskFS.counters)."""
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


if __name__ == "__main__":
    sys.exit(main())
