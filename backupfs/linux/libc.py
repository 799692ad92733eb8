"""The C library, for the few calls Python's os module lacks (syncfs, statfs, prctl).

libc is already loaded into the interpreter, so `CDLL(None)` finds it without running
ldconfig (which `ctypes.util.find_library` does, at ~20 ms a call).
"""

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str, path: str | None = None) -> None:
    """Raise OSError with errno and `what` when a libc call returned non-zero."""
    if result != 0:
        err = ctypes.get_errno()
        if path is None:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        raise OSError(err, os.strerror(err), path)
