"""Best-effort process and kernel tuning for the mount daemon (measured in docs/benchmarks.md)."""

import ctypes
import ctypes.util
import logging

from backupfs.mounts import read_mounts_dev

log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KERNEL_READAHEAD_KB = 1024


def keep_large_buffers_in_heap(max_buffer_bytes: int, trim_bytes: int) -> None:
    """Reuse freed multi-MiB reply buffers instead of mmap/munmap per request.

    Fresh mmap pages fault on first touch; with glibc's defaults every 8 MiB reply costs
    2048 page faults. Raising the mmap threshold above the largest reply keeps them in
    the heap, and the trim threshold bounds how much freed memory the heap may hold.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(max_buffer_bytes))
        libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_bytes))
    except (OSError, AttributeError) as exc:
        log.debug("mallopt unavailable: %s", exc)


def raise_kernel_readahead(mountpoint: str) -> None:
    """Let the kernel send 1 MiB FUSE reads for sequential streams (default 128 KiB).

    Uses the mount's own bdi, so nothing else on the machine changes; needs root.
    Reads mountinfo rather than stat()ing the mountpoint, which would ask our own
    not-yet-running FUSE loop.
    """
    dev = read_mounts_dev(mountpoint)
    if dev is None:
        return
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(KERNEL_READAHEAD_KB))
    except OSError as exc:
        log.info("kernel readahead left at its default: %s", exc)
