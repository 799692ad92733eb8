"""Copying one entry with its metadata, under a temporary name renamed into place.

Metadata kept: mode (setuid/setgid included, applied after chown), numeric owner and
group, atime/mtime in ns, xattrs (user.*, security.*, trusted.*, and POSIX ACLs through
system.posix_acl_*). Holes in sparse files stay holes.
"""

import contextlib
import errno
import hashlib
import os
import stat
import threading

TMP_PREFIX = ".backupfs-tmp."
CHUNK_BYTES = 8 << 20


class Stopped(Exception):
    """The restore was interrupted: a streamed copy gives up between two chunks (its
    temporary file is removed, as on any failure)."""


def tmp_name(final: str) -> str:
    head, tail = os.path.split(final)
    digest = hashlib.sha256(os.fsencode(tail)).hexdigest()[:20]
    return os.path.join(head, TMP_PREFIX + digest)


def remove_stale_tmp(directory: str) -> None:
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def copy_xattrs(src: str, dst: str | int, follow: bool = True) -> None:
    """Every readable xattr of src onto dst; a name the target refuses raises OSError."""
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        value = os.getxattr(src, name, follow_symlinks=follow)
        if isinstance(dst, int):
            os.setxattr(dst, name, value)
        else:
            os.setxattr(dst, name, value, follow_symlinks=follow)


def apply_metadata(fd: int, src: str, st: os.stat_result, is_root: bool) -> None:
    if is_root:
        os.fchown(fd, st.st_uid, st.st_gid)
    copy_xattrs(src, fd)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))  # after chown, which clears setuid/setgid
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def is_complete(final: str, st: os.stat_result) -> bool:
    """A file from an earlier run: same size and mtime as the source."""
    try:
        have = os.lstat(final)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISREG(have.st_mode)
        and have.st_size == st.st_size
        and (have.st_mtime_ns == st.st_mtime_ns)
    )


def _copy_data(
    src_fd: int, dst_fd: int, size: int, sparse: bool, stop: threading.Event | None
) -> None:
    pos = 0
    while pos < size:
        if sparse:
            try:
                pos = os.lseek(src_fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(src_fd, pos, os.SEEK_HOLE)
        else:
            end = size
        while pos < end:
            if stop is not None and stop.is_set():
                raise Stopped()
            chunk = os.pread(src_fd, min(CHUNK_BYTES, end - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "source file shrank while being read")
            os.pwrite(dst_fd, chunk, pos)
            pos += len(chunk)
    os.ftruncate(dst_fd, size)


def write_file(
    final: str,
    data: bytes | None,
    src: str,
    st: os.stat_result,
    is_root: bool,
    stop: threading.Event | None = None,
) -> None:
    """Write under a temporary name and rename into place. With data None, copy from src
    (streaming, holes kept, giving up with Stopped once `stop` is set); otherwise `data`
    is the whole content, already read."""
    tmp = tmp_name(final)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o600)
    try:
        if data is None:
            src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                sparse = st.st_blocks * 512 < st.st_size
                _copy_data(src_fd, fd, st.st_size, sparse, stop)
            finally:
                os.close(src_fd)
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        apply_metadata(fd, src, st, is_root)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, final)


def read_small(src: str, st: os.stat_result) -> bytes:
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        data = os.read(fd, st.st_size + 1) if st.st_size else b""
    finally:
        os.close(fd)
    if len(data) != st.st_size:
        raise OSError(errno.EIO, "source file changed size while being read")
    return data


def make_link(final: str, existing: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.samefile(final, existing):
            return  # already linked (rename onto the same inode would leave tmp behind)
    tmp = tmp_name(final)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.link(existing, tmp)
    os.rename(tmp, final)


def make_other(final: str, src: str, st: os.stat_result, is_root: bool) -> None:
    """Symlinks (not followed), fifos and, as root, device nodes."""
    tmp = tmp_name(final)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), tmp)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(tmp, 0o600)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
    else:
        raise OSError(errno.EINVAL, "unknown file type")
    try:
        if is_root:
            os.chown(tmp, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            copy_xattrs(src, tmp)
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.rename(tmp, final)
