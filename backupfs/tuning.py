"""Best-effort kernel tuning for the mount daemon (measured in docs/benchmarks.md)."""

import logging

from backupfs.mounts import read_mounts_dev

log = logging.getLogger(__name__)
KERNEL_READAHEAD_KB = 1024


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
