"""Process flags of the kernel (prctl(2))."""

import ctypes

from backupfs.linux.libc import libc

PR_SET_IO_FLUSHER = 57  # Linux 5.6+, needs CAP_SYS_RESOURCE


def set_io_flusher() -> int:
    """Mark this process as one that serves I/O; 0, or the errno of the refusal."""
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        return ctypes.get_errno()
    return 0
