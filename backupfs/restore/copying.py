"""Copying one entry with its metadata, under a temporary name renamed into place.

Every call on DEST names one component relative to a directory descriptor (desttree.py)
and follows no symlink: temporary files are created with O_EXCL, metadata is applied
through the descriptor of what this restore just created (fchown, fsetxattr, fchmod,
futimens), symlinks get their owner and times with the *at calls' no-follow flag, fifos and
device nodes through an O_PATH descriptor checked to be the node just made. The source, a
read-only tree, is read by path, each file opened with O_NOFOLLOW|O_NONBLOCK.

Metadata kept: mode (setuid/setgid included, applied after chown, which clears them),
numeric owner and group, atime/mtime in ns, xattrs (user.*, security.*, trusted.*, and
POSIX ACLs through system.posix_acl_*). Holes in sparse files stay holes. `Policy` with
no_special drops setuid/setgid bits and security.capability (untrusted backups).
"""

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

TMP_PREFIX = ".backupfs-tmp."
CAPABILITY = "security.capability"
SETID = stat.S_ISUID | stat.S_ISGID
SRC_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
Xattrs = list[tuple[str, bytes]]
# Copies a large file's data from the source's descriptor into its temporary file's.
Fill = Callable[[int, int], None]


class Stopped(Exception):
    """The restore was interrupted: a streamed copy gives up between two chunks (its
    temporary file is removed, as on any failure; fastcopy.py, pieces.py)."""


@dataclass(frozen=True)
class Policy:
    """What of the source's metadata is applied: owners only as root; with no_special,
    no setuid/setgid bits on anything but directories and no file capabilities."""

    is_root: bool
    no_special: bool = False

    def mode(self, st: os.stat_result) -> int:
        mode = stat.S_IMODE(st.st_mode)
        if self.no_special and not stat.S_ISDIR(st.st_mode):
            mode &= ~SETID
        return mode

    def xattrs(self, xattrs: Xattrs) -> Xattrs:
        return [x for x in xattrs if x[0] != CAPABILITY] if self.no_special else xattrs


def tmp_name(name: str) -> str:
    """The temporary name beside `name`, the same on every run (so a resume finds it)."""
    return TMP_PREFIX + hashlib.sha256(os.fsencode(name)).hexdigest()[:20]


def remove_stale_tmp(dir_fd: int) -> None:
    """Temporary files an interrupted run left in this directory."""
    with os.scandir(dir_fd) as it:
        stale = [entry.name for entry in it if entry.name.startswith(TMP_PREFIX)]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def read_xattrs(src: str | int) -> Xattrs:
    """Every readable xattr of a source path (not followed) or descriptor."""
    try:
        if isinstance(src, int):
            names = os.listxattr(src)
        else:
            names = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    out = []
    for name in names:
        try:
            if isinstance(src, int):
                out.append((name, os.getxattr(src, name)))
            else:
                out.append((name, os.getxattr(src, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed since listed
                raise
    return out


def apply_metadata(fd: int, xattrs: Xattrs, st: os.stat_result, policy: Policy) -> None:
    """Owner, xattrs, mode and times, on a descriptor of what this restore made or
    checked (a file it created, a directory opened without following symlinks)."""
    if policy.is_root:
        os.fchown(fd, st.st_uid, st.st_gid)
    for name, value in policy.xattrs(xattrs):  # after chown, which clears capabilities
        os.setxattr(fd, name, value)
    os.fchmod(fd, policy.mode(st))  # after chown, which clears setuid/setgid
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def is_complete(have: os.stat_result, st: os.stat_result) -> bool:
    """A file from an earlier run: same size and mtime as the source."""
    same = have.st_size == st.st_size and have.st_mtime_ns == st.st_mtime_ns
    return stat.S_ISREG(have.st_mode) and same


def _create(dir_fd: int, tmp: str) -> int:
    """A new, empty file of our own under `tmp`: whatever has that name (a stale
    temporary, or anything planted there) is unlinked, never opened."""
    try:
        return os.open(tmp, TMP_FLAGS, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(tmp, dir_fd=dir_fd)
        return os.open(tmp, TMP_FLAGS, 0o600, dir_fd=dir_fd)


def write_file(
    dir_fd: int,
    name: str,
    data: tuple[bytes, Xattrs] | Fill,
    src: str,
    st: os.stat_result,
    policy: Policy,
) -> Xattrs:
    """Write `name` in the directory `dir_fd` under a temporary name and rename it into
    place. `data` is the whole content and xattrs, already read, or a Fill: it is given
    the source opened here and the temporary file, copies the data (holes kept, pieces
    spread over readers: pieces.py), and may raise Stopped. Data first, then the size (a
    trailing hole), then the metadata; on any failure the temporary file is removed.
    Returns the source's xattrs."""
    tmp = tmp_name(name)
    fd = _create(dir_fd, tmp)
    try:
        if callable(data):
            src_fd = os.open(src, SRC_FLAGS)
            try:
                data(src_fd, fd)
                os.ftruncate(fd, st.st_size)
                xattrs = read_xattrs(src_fd)
            finally:
                os.close(src_fd)
        else:
            content, xattrs = data
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
        apply_metadata(fd, xattrs, st, policy)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return xattrs


def read_small(src: str, st: os.stat_result) -> tuple[bytes, Xattrs]:
    """A small source file's content and xattrs, read through one descriptor."""
    fd = os.open(src, SRC_FLAGS)
    try:
        data = os.read(fd, st.st_size + 1) if st.st_size else b""
        xattrs = read_xattrs(fd)
    finally:
        os.close(fd)
    if len(data) != st.st_size:
        raise OSError(errno.EIO, "source file changed size while being read")
    return data, xattrs


def make_link(first_fd: int, first: str, shown: str, dir_fd: int, name: str) -> None:
    """Hard-link `name` in `dir_fd` to the regular file `first` in `first_fd` (`shown`:
    its path in DEST, for the error); links no symlink and follows none."""
    have = os.stat(first, dir_fd=first_fd, follow_symlinks=False)
    if not stat.S_ISREG(have.st_mode):
        raise OSError(errno.EINVAL, f"{shown} is not a regular file in DEST, not linked to")
    with contextlib.suppress(FileNotFoundError):
        there = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (there.st_dev, there.st_ino) == (have.st_dev, have.st_ino):
            return  # already linked (rename onto the same inode would leave tmp behind)
    tmp = tmp_name(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    os.link(first, tmp, src_dir_fd=first_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _node_metadata(
    dir_fd: int, tmp: str, st: os.stat_result, xattrs: Xattrs, policy: Policy
) -> None:
    """Owner, xattrs, mode and times of the fifo or device node just made as `tmp`,
    through an O_PATH descriptor of it (opening the node itself could block or reach a
    driver); the descriptor is first checked to be that node, not something put there."""
    fd = os.open(tmp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        have = os.fstat(fd)
        same_kind = stat.S_IFMT(have.st_mode) == stat.S_IFMT(st.st_mode)
        is_device = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        if not same_kind or have.st_nlink != 1 or (is_device and have.st_rdev != st.st_rdev):
            raise OSError(errno.EAGAIN, "changed by someone else while being made")
        path = f"/proc/self/fd/{fd}"  # the node itself, whatever its name is now
        if policy.is_root:
            os.chown(path, st.st_uid, st.st_gid)
        for name, value in policy.xattrs(xattrs):
            os.setxattr(path, name, value)
        os.chmod(path, policy.mode(st))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)


def make_other(dir_fd: int, name: str, src: str, st: os.stat_result, policy: Policy) -> Xattrs:
    """Symlinks (not followed), fifos, sockets and, as root, device nodes; returns the
    source's xattrs (none for a symlink)."""
    tmp = tmp_name(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    xattrs: Xattrs = []
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), tmp, dir_fd=dir_fd)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(tmp, 0o600, dir_fd=dir_fd)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dir_fd)
    else:
        raise OSError(errno.EINVAL, "unknown file type")
    try:
        if stat.S_ISLNK(st.st_mode):
            if policy.is_root:
                os.chown(tmp, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
            times = (st.st_atime_ns, st.st_mtime_ns)
            os.utime(tmp, ns=times, dir_fd=dir_fd, follow_symlinks=False)
        else:
            xattrs = read_xattrs(src)
            _node_metadata(dir_fd, tmp, st, xattrs, policy)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return xattrs
