"""`backupfs attach`, `detach` and `status`: disk image -> loop clones -> read-only mounts.

Clone 0 of each partition is mounted at TARGET/p<K>; clones 1..N-1 under the run
directory, where `backupfs restore` spreads its readers. Every step is journalled first
(attach_state.py), and any failure undoes what was done.

The filesystems publish the backup's files with their original owners and modes, so
TARGET is the gate: 0700 (0755 with --share), and a directory of ours. Each mount goes
on a descriptor of the directory attach made (`/proc/self/fd/N` of an O_PATH|O_NOFOLLOW
open), so a name turned into a symlink meanwhile cannot send it elsewhere; detach
unmounts a path only while the recorded loop device is what is mounted there.
"""

import contextlib
import dataclasses
import errno
import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backupfs.attach import fstypes
from backupfs.attach import state as attach_state
from backupfs.attach.partitions import Partition, Run, joined_volume, read_disk
from backupfs.attach.state import Attachment, LoopRecord, MountRecord, PartitionRecord
from backupfs.errors import UsageError, UserError
from backupfs.linux import loopdev
from backupfs.linux.mountinfo import read_mounts
from backupfs.linux.tools import failure_reason

MOUNT_TIMEOUT_S = 120
DEFAULT_CLONES = 4
# Asks the mount daemon to serve an LVM volume's runs as one file: its path (or a
# UserError with the reason). The CLI passes plan.volumes.serve_volume.
ServeVolume = Callable[[str, tuple[Run, ...]], str]


@dataclass(frozen=True)
class AttachRequest:
    image: str
    target: str
    clones: int = DEFAULT_CLONES
    partition: int | None = None  # only this partition
    follow_symlinks: bool = False
    direct_io: bool = False
    share: bool = False  # TARGET 0755 instead of 0700: other users may read the backup


_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _check_image(image: str) -> int:
    try:
        fd = os.open(image, os.O_RDONLY)
    except FileNotFoundError:
        raise UserError(f"{image}: no such file") from None
    except OSError as exc:
        raise UserError(f"{image}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{image}: is a directory, not a disk image")
    size = st.st_size
    if size == 0:
        raise UserError(f"{image}: empty file, not a disk image")
    return size


def _prepare_target(target: str) -> tuple[bool, int | None]:
    """Create TARGET (0700) if absent, else check that it is an empty directory of ours:
    whether it was created, and the mode it had if not."""
    if any(m.mount_point == target for m in read_mounts()):
        raise UserError(f"{target}: something is already mounted there")
    if attach_state.load(target) is not None:
        raise UserError(f"{target}: already attached (run `backupfs detach {target}` first)")
    if not os.path.lexists(target):
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(target, 0o700)
            return True, None
        except FileExistsError:
            pass  # made meanwhile: checked below like any existing TARGET
        except OSError as exc:
            raise UserError(f"{target}: cannot create it: {exc.strerror}") from None
    try:
        fd = os.open(target, _OPEN_DIR)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise UserError(f"{target}: not a directory") from None
        raise UserError(f"{target}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if os.listdir(fd):
            raise UserError(f"{target}: not empty")
    finally:
        os.close(fd)
    if st.st_uid != os.geteuid():
        raise UserError(
            f"{target}: owned by uid {st.st_uid}, who could open it to others or swap what is "
            "mounted in it: use a directory of yours (attach makes an absent one)"
        )
    return False, stat.S_IMODE(st.st_mode)


def _set_target_mode(target: str, mode: int) -> None:
    fd = os.open(target, _OPEN_DIR)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _fd_path(fd: int) -> str:
    """Where the kernel says an open directory is (symlinks resolved, as mountinfo does)."""
    return os.readlink(f"/proc/self/fd/{fd}")


def _claim_dir(path: str) -> int:
    """An O_PATH descriptor of the directory `path`, made here (0700) or one of ours already
    there; never what a symlink at `path` points to. Mounting on the descriptor rather
    than on the name means a later swap of the name cannot redirect the mount."""
    refused = UserError(f"{path}: not a directory attach made (a symlink?): not mounting there")
    parent, name = os.path.split(path)
    try:
        pfd = os.open(parent, _DIR_FLAGS)
    except OSError as exc:
        raise UserError(f"{parent}: cannot make mount points in it: {exc.strerror}") from None
    try:
        if _fd_path(pfd) != parent:
            raise refused
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=pfd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError:
            raise refused from None
        parent_dev = os.fstat(pfd).st_dev
    finally:
        os.close(pfd)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_dev != parent_dev or _fd_path(fd) != path:
        os.close(fd)
        raise refused
    return fd


def _mounted_paths() -> set[str]:
    return {m.mount_point for m in read_mounts()}


def _mount(rec: MountRecord, fd: int) -> None:
    """Mount `rec` on the directory open as `fd` (from _claim_dir), by its /proc/self/fd
    name, which mount(8) must not resolve to a path (--no-canonicalize)."""
    on = f"/proc/self/fd/{fd}"
    argv = ["mount", "--no-canonicalize", "-t", rec.fstype, "-o", rec.options, rec.device, on]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S, pass_fds=(fd,)
    )
    if proc.returncode != 0:
        reason = failure_reason(proc, "mount: ").replace(on, rec.path)
        raise UserError(
            f"{os.path.basename(rec.path)} ({rec.fstype}) refused to mount read-only: {reason} "
            "(--partition K attaches the others)"
        )
    where = _fd_path(fd)  # moved meanwhile: only by root, but never leave it there unsaid
    if where != rec.path:
        subprocess.run(["umount", "--no-canonicalize", where], capture_output=True,
                       timeout=MOUNT_TIMEOUT_S)  # fmt: skip
        raise UserError(f"{rec.path}: moved to {where} while attaching")
    if fstypes.is_userspace(rec.fstype):
        _set_mount_flags(rec)


def _set_mount_flags(rec: MountRecord) -> None:
    """A FUSE driver (ntfs-3g) keeps the options it knows and drops the others silently
    (nosymfollow): set the mount's flags again, on the mount itself (a bind remount)."""
    argv = ["mount", "--no-canonicalize", "-o", f"remount,bind,{rec.options}", rec.path]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)
    if proc.returncode != 0:
        subprocess.run(["umount", "--no-canonicalize", rec.path], capture_output=True,
                       timeout=MOUNT_TIMEOUT_S)  # fmt: skip
        reason = failure_reason(proc, "mount: ")
        raise UserError(
            f"{os.path.basename(rec.path)} ({rec.fstype}): cannot set {rec.options}: {reason}"
        )


def _select(parts: list[Partition], req: AttachRequest) -> list[Partition]:
    if req.partition is None:
        return parts
    chosen = [p for p in parts if p.number == req.partition]
    if not chosen:
        have = ", ".join(p.name for p in parts)
        raise UserError(f"{req.image} has no partition {req.partition} (it has {have})")
    return chosen


def _joined(parts: list[Partition], serve_volume: ServeVolume | None) -> list[Partition]:
    """Each volume of several runs served by the mount daemon and probed there, or given
    the reason it cannot be."""
    out = []
    for part in parts:
        if part.runs is None or part.reason is not None:
            out.append(part)
            continue
        try:
            if serve_volume is None:
                raise UserError("its segments must be joined, and nothing here joins them")
            assert part.volume is not None
            out.append(joined_volume(part, serve_volume(part.volume, part.runs)))
        except UserError as exc:
            out.append(dataclasses.replace(part, reason=str(exc)))
    return out


def attach(
    req: AttachRequest,
    after_loops: Callable[[], None] | None = None,
    serve_volume: ServeVolume | None = None,
) -> Attachment:
    """Attach as `req` says. `after_loops` runs once every loop device exists and none is
    mounted yet (tests interrupt attach there)."""
    image, target = os.path.realpath(req.image), os.path.realpath(req.target)
    if req.clones < 1:
        raise UsageError("--clones must be at least 1")
    size = _check_image(image)
    parts = _joined(_select(read_disk(image, size), req), serve_volume)
    records = [
        PartitionRecord(p.number, p.start_bytes, p.size_bytes, p.fstype, p.label,
                        p.reason or fstypes.skip_reason(p.fstype), p.volume, p.backing)
        for p in parts
    ]  # fmt: skip
    mountable = [r for r in records if r.skipped is None]
    if not mountable:
        reasons = "; ".join(f"{r.shown}: {r.skipped}" for r in records)
        raise UserError(f"{req.image}: nothing to mount ({reasons})")
    created, mode = _prepare_target(target)
    att = Attachment(target, image, req.clones, created, partitions=records, target_mode=mode)
    attach_state.save(att)
    try:
        _set_up(att, mountable, req, after_loops)
    except BaseException:
        with contextlib.suppress(UserError):
            detach_attachment(att)
        raise
    return att


def _set_up(
    att: Attachment,
    mountable: list[PartitionRecord],
    req: AttachRequest,
    after_loops: Callable[[], None] | None,
) -> None:
    _set_target_mode(att.target, 0o755 if req.share else 0o700)
    if req.clones > 1:
        attach_state.clones_dir()  # checked: owned by root or us, 0700
        for d in [att.private_dir, *(att.private_dir / f"c{c}" for c in range(1, req.clones))]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o700)
    for clone in range(req.clones):
        for part in mountable:
            on = part.backing or att.image
            device = loopdev.attach(on, part.start_bytes, part.size_bytes, req.direct_io)
            att.loops.append(LoopRecord(device, part.number, clone, part.start_bytes, part.backing))
            attach_state.save(att)
    if after_loops is not None:
        after_loops()
    for loop in att.loops:
        part = next(p for p in mountable if p.number == loop.partition)
        assert part.fstype is not None
        path = att.mount_path(loop.clone, part.number)
        options = fstypes.mount_options(part.fstype, req.follow_symlinks)
        driver = fstypes.mount_type(part.fstype)
        rec = MountRecord(path, loop.device, part.number, loop.clone, driver, options)
        att.mounts.append(rec)
        attach_state.save(att)  # journal before the mount point and the mount exist
        fd = _claim_dir(path)
        try:
            _mount(rec, fd)
        finally:
            os.close(fd)
    att.complete = True
    attach_state.save(att)


def _ours_mounted(rec: MountRecord) -> bool:
    """Whether `rec`'s loop device is mounted at its path; a UserError if something else is
    on top there (detach never unmounts what attach did not mount)."""
    here = [m for m in read_mounts() if m.mount_point == rec.path]
    if not here:
        return False
    if here[-1].source != rec.device:
        raise UserError(
            f"{rec.path}: {here[-1].source} is mounted there, not {rec.device}: not unmounting it"
        )
    return True


def _unmount(rec: MountRecord) -> None:
    path = rec.path
    if not _ours_mounted(rec):
        return
    if os.path.realpath(path) != path:  # mountinfo names it so: a symlink swapped in since
        raise UserError(f"{path}: now leads elsewhere through a symlink: not unmounting it")
    argv = ["umount", "--no-canonicalize", path]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)
    if proc.returncode != 0 and _ours_mounted(rec):
        raise UserError(f"{path} is busy: close what uses it (fuser -vm {path}) and retry")


def _remove_empty_dirs(att: Attachment) -> None:
    mounted = _mounted_paths()
    for rec in att.mounts:
        if rec.path not in mounted:
            with contextlib.suppress(OSError):
                os.rmdir(rec.path)
    private = att.private_dir
    if private.exists():
        for sub in sorted(private.glob("*"), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(sub)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    if att.created_target:
        with contextlib.suppress(OSError):
            os.rmdir(att.target)
    elif att.target_mode is not None:  # the mode it had before attach made it 0700
        with contextlib.suppress(OSError):
            _set_target_mode(att.target, att.target_mode)


def detach_attachment(att: Attachment) -> None:
    """Undo everything recorded, in reverse order; safe to run again after a failure."""
    for rec in reversed(att.mounts):
        _unmount(rec)
    for loop in reversed(att.loops):
        loopdev.detach(loop.device, loop.backing or att.image, loop.start_bytes)
    _remove_empty_dirs(att)
    attach_state.remove(att)


def detach(target: str) -> bool:
    """Detach what is attached at TARGET; False if nothing was."""
    att = attach_state.load(os.path.realpath(target))
    if att is None:
        return False
    detach_attachment(att)
    return True


def describe(att: Attachment) -> list[str]:
    mounted = _mounted_paths()
    lines = [f"{att.target}  <-  {att.image}  ({att.clones} clones)"]
    if not att.complete:
        lines.append("  INCOMPLETE (attach was interrupted): run `backupfs detach` on it")
    for part in att.partitions:
        label = f" [{part.label}]" if part.label else ""
        head = f"  {part.shown}  {part.fstype or '-'}{label}"
        if part.skipped:
            lines.append(f"{head}  skipped: {part.skipped}")
            continue
        clones = att.clone_mounts(part.number)
        live = sum(m.path in mounted for m in clones)
        devices = " ".join(m.device for m in clones)
        drivers = sorted({m.fstype for m in clones if fstypes.is_userspace(m.fstype)})
        by = f" by {', '.join(drivers)}" if drivers else ""
        if part.backing:
            by += ", its segments joined by the mount daemon"
        lines.append(f"{head}  {live}/{len(clones)} mounted{by}  ({devices})")
    return lines
