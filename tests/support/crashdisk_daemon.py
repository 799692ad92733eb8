"""The crashdisk daemon: a FUSE disk with a volatile write cache that can lose power.

Run as its own process (`tests/support/crashdisk.py`'s ``CrashDisk`` starts it and puts ext4
on it; its docstring says how the kernel's durability requests get here)::

    python3 -m tests.support.crashdisk_daemon DURABLE_FILE MOUNTPOINT

It exposes one file, ``MOUNTPOINT/disk.img``, as large as DURABLE_FILE, and prints ``READY``
on stdout once it serves requests. It behaves like a disk with a write cache:

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

Choices that keep kernel caches from hiding or reordering writes:

* No FUSE writeback cache. pyfuse3's ``fuse_init`` asks for FUSE_CAP_WRITEBACK_CACHE only if
  ``Operations.enable_writeback_cache`` is true (libfuse 3 does not turn it on by itself); it
  is false here, set explicitly. (It would even be correct - ``fuse_fsync`` writes back and
  waits for dirty pages before it sends FSYNC, and dirty pages left at the cut would only be
  sent after it and be discarded - but without it every write is a request the daemon sees.)
* ``disk.img`` is opened with FOPEN_DIRECT_IO (``FileInfo.direct_io``), so the FUSE inode
  has no page cache at all: no read can be served from pages the daemon has since dropped.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pyfuse3
import trio

PAGE = 4096
DISK_NAME = "disk.img"
CONTROL_NAME = ".powercut"
READY_LINE = "READY"

_ROOT_INO = pyfuse3.ROOT_INODE
_DISK_INO = _ROOT_INO + 1
_CTL_INO = _ROOT_INO + 2

log = logging.getLogger("crashdisk")


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


if __name__ == "__main__":
    sys.exit(main())
