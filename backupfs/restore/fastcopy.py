"""Copying one byte range of a source file into the same range of its copy, with as few
Python copies as the kernel allows, and starting the copy's writeback as it goes.

Two ways, tried in this order for each file and shared by every thread copying a part of
it (`Route`): copy_file_range(2), which on one filesystem copies inside the kernel (or
shares the extents, on XFS and btrfs); then preadv/pwrite through one buffer per thread,
reused for every chunk. Between two filesystems (a loop-mounted backup and DEST)
copy_file_range says EXDEV, and a filesystem may say EINVAL, ENOSYS or EOPNOTSUPP: the
way refused is not tried again for that file. Any other error (EIO, ENOSPC) is the
file's failure.

Why these, as measured on the benchmark VM (docs/benchmarks.md, "Durable restore versus
cp"): the old loop, a new 8 MiB bytes object per os.pread, took 1.3-1.8 s to copy 1 GiB
from the page cache, against 0.25-0.4 s for copy_file_range, splice or a reused buffer.
Writes of 1 MiB were slow (1 GiB restored from a loop mount in 1.8-2.5 s against
0.65-0.8 s with 128 KiB writes; perf puts the time in the kernel's memcpy into the new
page cache, likely the VM backing the large folios such writes allocate), so the buffer
is 128 KiB, like cp's. splice(2) through a 128 KiB pipe came out no faster than
read/write (0.77-0.82 s against 0.65-0.71 s), so it is not used.

Writeback: every WRITEBACK_BYTES copied, sync_file_range(SYNC_FILE_RANGE_WRITE) asks the
kernel to start writing that range to disk now. It waits for no write to complete and
promises nothing: the restore is made durable, as before, by its one syncfs at the end,
which then finds most of a large file written already instead of all of it dirty (1 GiB
below the dirty thresholds is otherwise not written before the flush); 1 GiB restored in
0.57-0.60 s with it, 0.74-0.82 s without. Write errors are still reported by the flush:
this call neither waits for them nor consumes them.
"""

import ctypes
import errno
import os
import threading

from backupfs.linux.libc import libc
from backupfs.restore.copying import Stopped

COPY_CHUNK_BYTES = 1 << 20  # one copy_file_range call; the restore's stop is checked between
BUFFER_BYTES = 128 << 10  # read/write's buffer, one per copying thread (see above: not more)
WRITEBACK_BYTES = 32 << 20  # writeback is started behind every this many bytes copied
# What a kernel or filesystem says when it cannot copy this way between these two files.
REFUSED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
COPY_FILE_RANGE, READ_WRITE = 0, 1
WAYS = ("copy_file_range", "read/write")
FIRST_WAY = COPY_FILE_RANGE  # where every file's Route starts (tests start later ones)
_SYNC_FILE_RANGE_WRITE = 2

_sync_file_range = getattr(libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing back [offset, offset + length) of `fd` now (see the module's
    docstring); a filesystem that cannot (EINVAL, ESPIPE) is simply left to the flush."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Route:
    """How one file's bytes go to its copy: the first way not yet refused for this pair of
    files. Shared by the threads copying its pieces; it only ever moves forward."""

    def __init__(self) -> None:
        self.way = FIRST_WAY

    def refuse(self, way: int) -> None:
        self.way = max(self.way, way + 1)


class RangeCopier:
    """One thread's copying of ranges from `src` to `dst` (both used at explicit offsets
    only, so threads may share the descriptors), with its own buffer; `close` it when
    done. It starts writeback of each WRITEBACK_BYTES of a contiguous run it copied,
    and, once it copied that much in all (a large file), of what is left of a run when
    it jumps elsewhere or is closed."""

    def __init__(self, src: int, dst: int, route: Route, stop: threading.Event) -> None:
        self.src, self.dst, self.route, self.stop = src, dst, route, stop
        self._buffer: memoryview | None = None
        self._run = (0, 0)  # copied since its writeback was last started
        self._copied = 0

    def copy(self, pos: int, end: int) -> None:
        """Bytes [pos, end) of the source to the same offsets of the copy; Stopped between
        two chunks once the restore stops."""
        if pos != self._run[1]:
            self._writeback_rest()
            self._run = (pos, pos)
        while pos < end:
            if self.stop.is_set():
                raise Stopped()
            done = self._step(pos, end - pos)
            pos += done
            self._copied += done
            self._run = (self._run[0], pos)
            if pos - self._run[0] >= WRITEBACK_BYTES:
                start_writeback(self.dst, self._run[0], pos - self._run[0])
                self._run = (pos, pos)

    def _writeback_rest(self) -> None:
        start, end = self._run
        if self._copied >= WRITEBACK_BYTES:
            start_writeback(self.dst, start, end - start)
        self._run = (end, end)

    def _step(self, pos: int, count: int) -> int:
        """Copy up to `count` bytes at `pos` (at least one), the first way that works."""
        while True:
            way = self.route.way
            try:
                if way == COPY_FILE_RANGE:
                    count = min(count, COPY_CHUNK_BYTES)
                    done = os.copy_file_range(self.src, self.dst, count, pos, pos)
                else:
                    done = self._read_write(pos, count)
            except OSError as exc:
                if way == READ_WRITE or exc.errno not in REFUSED:
                    raise
                self.route.refuse(way)
                continue
            if done:
                return done
            if way == READ_WRITE:
                raise OSError(errno.EIO, "source file shrank while being read")
            # Nothing before the end: some kernels say so for files they cannot copy
            # this way; the next way tells a source that really shrank.
            self.route.refuse(way)

    def _read_write(self, pos: int, count: int) -> int:
        if self._buffer is None:
            self._buffer = memoryview(bytearray(BUFFER_BYTES))
        got = os.preadv(self.src, [self._buffer[: min(count, BUFFER_BYTES)]], pos)
        view, at = self._buffer[:got], pos
        while view:
            put = os.pwrite(self.dst, view, at)
            view, at = view[put:], at + put
        return got

    def close(self) -> None:
        self._writeback_rest()
        self._buffer = None
