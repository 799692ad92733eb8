"""`backupfs attach`, `detach` and `status`: disk image -> loop clones -> read-only mounts.

Clone 0 of each partition is mounted at TARGET/p<K>; clones 1..N-1 under the run
directory, where `backupfs restore` spreads its readers. Every step is journalled first
(attach_state.py), and any failure undoes what was done.
"""

import contextlib
import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backupfs.attach import fstypes
from backupfs.attach import state as attach_state
from backupfs.attach.partitions import Partition, read_disk
from backupfs.attach.state import Attachment, LoopRecord, MountRecord, PartitionRecord
from backupfs.errors import UsageError, UserError
from backupfs.linux import loopdev
from backupfs.linux.mountinfo import read_mounts
from backupfs.linux.tools import failure_reason

MOUNT_TIMEOUT_S = 120
DEFAULT_CLONES = 4


@dataclass(frozen=True)
class AttachRequest:
    image: str
    target: str
    clones: int = DEFAULT_CLONES
    partition: int | None = None  # only this partition
    follow_symlinks: bool = False
    direct_io: bool = False


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


def _prepare_target(target: str) -> bool:
    """Create TARGET if absent (returns True) or check that it is an empty directory."""
    if any(m.mount_point == target for m in read_mounts()):
        raise UserError(f"{target}: something is already mounted there")
    if attach_state.load(target) is not None:
        raise UserError(f"{target}: already attached (run `backupfs detach {target}` first)")
    path = Path(target)
    if not path.exists():
        path.mkdir(parents=True)
        return True
    if not path.is_dir():
        raise UserError(f"{target}: not a directory")
    if any(path.iterdir()):
        raise UserError(f"{target}: not empty")
    return False


def _mounted_paths() -> set[str]:
    return {m.mount_point for m in read_mounts()}


def _mount(rec: MountRecord) -> None:
    argv = ["mount", "-t", rec.fstype, "-o", rec.options, rec.device, rec.path]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)
    if proc.returncode != 0:
        reason = failure_reason(proc, "mount: ")
        raise UserError(
            f"p{rec.partition} ({rec.fstype}) refused to mount read-only: {reason} "
            "(--partition K attaches the others)"
        )


def _select(parts: list[Partition], req: AttachRequest) -> list[Partition]:
    if req.partition is None:
        return parts
    chosen = [p for p in parts if p.number == req.partition]
    if not chosen:
        have = ", ".join(p.name for p in parts)
        raise UserError(f"{req.image} has no partition {req.partition} (it has {have})")
    return chosen


def attach(req: AttachRequest, after_loops: Callable[[], None] | None = None) -> Attachment:
    """Attach as `req` says. `after_loops` runs once every loop device exists and none is
    mounted yet (tests interrupt attach there)."""
    image, target = os.path.realpath(req.image), os.path.realpath(req.target)
    if req.clones < 1:
        raise UsageError("--clones must be at least 1")
    size = _check_image(image)
    parts = _select(read_disk(image, size), req)
    records = [
        PartitionRecord(p.number, p.start_bytes, p.size_bytes, p.fstype, p.label,
                        fstypes.skip_reason(p.fstype))
        for p in parts
    ]  # fmt: skip
    mountable = [r for r in records if r.skipped is None]
    if not mountable:
        reasons = "; ".join(f"p{r.number}: {r.skipped}" for r in records)
        raise UserError(f"{req.image}: nothing to mount ({reasons})")
    created = _prepare_target(target)
    att = Attachment(target, image, req.clones, created, partitions=records)
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
    for clone in range(req.clones):
        for part in mountable:
            device = loopdev.attach(att.image, part.start_bytes, part.size_bytes, req.direct_io)
            att.loops.append(LoopRecord(device, part.number, clone, part.start_bytes))
            attach_state.save(att)
    if after_loops is not None:
        after_loops()
    for loop in att.loops:
        part = next(p for p in mountable if p.number == loop.partition)
        assert part.fstype is not None
        base = Path(att.target) if loop.clone == 0 else att.private_dir / f"c{loop.clone}"
        path = base / f"p{part.number}"
        path.mkdir(parents=True, exist_ok=True)
        options = fstypes.mount_options(part.fstype, req.follow_symlinks)
        rec = MountRecord(str(path), loop.device, part.number, loop.clone, part.fstype, options)
        att.mounts.append(rec)
        attach_state.save(att)  # journal before the mount exists
        _mount(rec)
    att.complete = True
    attach_state.save(att)


def _unmount(path: str) -> None:
    proc = subprocess.run(["umount", path], capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)
    if proc.returncode != 0 and path in _mounted_paths():
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


def detach_attachment(att: Attachment) -> None:
    """Undo everything recorded, in reverse order; safe to run again after a failure."""
    mounted = _mounted_paths()
    for rec in reversed(att.mounts):
        if rec.path in mounted:
            _unmount(rec.path)
    for loop in reversed(att.loops):
        loopdev.detach(loop.device, att.image, loop.start_bytes)
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
        head = f"  p{part.number}  {part.fstype or '-'}{label}"
        if part.skipped:
            lines.append(f"{head}  skipped: {part.skipped}")
            continue
        clones = att.clone_mounts(part.number)
        live = sum(m.path in mounted for m in clones)
        devices = " ".join(m.device for m in clones)
        lines.append(f"{head}  {live}/{len(clones)} mounted  ({devices})")
    return lines
