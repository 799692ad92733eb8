"""Best-effort kernel tuning for the mount daemon (measured in docs/benchmarks.md)."""

import logging

from backupfs.linux.mountinfo import read_mounts_dev
from backupfs.linux.process import set_io_flusher

log = logging.getLogger(__name__)
KERNEL_READAHEAD_KB = 1024


def mark_io_flusher() -> None:
    """Tell the kernel this process serves I/O (Linux 5.6+, needs CAP_SYS_RESOURCE).

    Memory reclaim triggered by the daemon's own allocations then never waits on I/O,
    which could need this very daemon: the classic deadlock of a FUSE file behind a loop
    device under memory pressure. The chain is read-only too, so reclaim never has dirty
    pages of it to write back.
    """
    err = set_io_flusher()
    if err:
        log.debug("PR_SET_IO_FLUSHER unavailable (errno %d)", err)


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
