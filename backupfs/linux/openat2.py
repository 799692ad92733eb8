"""openat2(2) (Linux 5.6+): open a path relative to a directory descriptor with limits on how
it resolves, e.g. never leaving that directory and following no symlink on the way. glibc
has no wrapper and Python none either, so this calls `syscall(SYS_openat2, ...)` with the
kernel's `struct open_how`.

`supported()` says whether the running kernel (and any seccomp filter in front of it) has
the call; callers without it walk the path one component at a time with O_NOFOLLOW.
"""

import ctypes
import errno
import os
import platform

from backupfs.linux.libc import libc

# include/uapi/linux/openat2.h
RESOLVE_NO_XDEV = 0x01  # stay on the starting mount
RESOLVE_NO_MAGICLINKS = 0x02  # no /proc/PID/fd/N style links
RESOLVE_NO_SYMLINKS = 0x04  # no symlink anywhere in the path, the last component included
RESOLVE_BENEATH = 0x08  # never above the starting directory: absolute paths, `..` out fail
RESOLVE_IN_ROOT = 0x10  # treat the starting directory as `/`
RESOLVE_CACHED = 0x20  # only from the dcache, else EAGAIN

# The number is 437 in the unified syscall table every architecture below uses (5.6+);
# alpha, ia64 and mips number their calls differently and are left to the fallback.
_SYS_OPENAT2 = 437
_MACHINES = {
    "x86_64", "i386", "i486", "i586", "i686", "aarch64", "arm64", "armv6l", "armv7l",
    "armv8l", "ppc", "ppc64", "ppc64le", "s390x", "riscv64", "loongarch64", "sparc64",
}  # fmt: skip


class OpenHow(ctypes.Structure):
    """struct open_how: three u64, 24 bytes (OPEN_HOW_SIZE_VER0)."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


# A function pointer of our own (indexing makes a new one), so setting its types does not
# change `libc.syscall` for anyone else.
_syscall = libc["syscall"]
_syscall.restype = ctypes.c_long
_syscall.argtypes = [
    ctypes.c_long,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(OpenHow),
    ctypes.c_size_t,
]


def syscall_number(machine: str | None = None) -> int | None:
    """SYS_openat2 on this machine, None where its number is not the unified one."""
    return _SYS_OPENAT2 if (machine or platform.machine()) in _MACHINES else None


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """A new descriptor for `path` relative to `dir_fd`, resolved under `resolve`
    (RESOLVE_*). Raises OSError like os.open: ELOOP for a symlink refused by
    RESOLVE_NO_SYMLINKS, EXDEV for a path leaving `dir_fd` under RESOLVE_BENEATH, ENOSYS
    where the kernel has no openat2."""
    number = syscall_number()
    if number is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), path)
    raw = os.fsencode(path)
    if b"\0" in raw:  # c_char_p would cut the path there
        raise OSError(errno.EINVAL, "embedded null byte", path)
    how = OpenHow(flags, mode, resolve)
    fd = _syscall(number, dir_fd, raw, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def supported(dir_fd: int) -> bool:
    """Whether openat2 works here: opens `.` beneath `dir_fd` once. ENOSYS (an old kernel)
    and EPERM (a seccomp filter that does not know the call) both mean no."""
    try:
        fd = openat2(
            dir_fd,
            ".",
            os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
            resolve=RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS,
        )
    except OSError:
        return False
    os.close(fd)
    return True
