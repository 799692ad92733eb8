"""What an attachment set up, journalled under the run directory before each step.

The file is rewritten atomically (write, fsync, rename) before every loop device and
mount is created, so a crash at any point leaves a record `backupfs detach` can undo.

Root acts on what a record says (unmounts, removes directories, frees loop devices), so
nothing here is trusted before it is checked. The run directory and its `attach/` and
`clones/` must be directories owned by root or the running user and writable by no one
else (made 0700; made 0700 again if merely readable by others). A record must be a
regular file of that owner, not writable by group or others, and name only its own
paths: its TARGET hashes to its file name, every mount is at TARGET/p<K> or under the
private clone directory, every device is a loop device. Anything else is refused in one
line.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backupfs.errors import UserError

RUN_DIR_ENV = "BACKUPFS_RUN_DIR"
RECORD_MAX_BYTES = 1 << 20  # a record of many partitions and clones is a few KiB
_LOOP_DEVICE = re.compile(r"/dev/loop[0-9]+")


def run_dir() -> Path:
    """The run directory, symlinks resolved: mountinfo and /proc/self/fd name paths so."""
    return Path(os.path.realpath(os.environ.get(RUN_DIR_ENV) or "/run/backupfs"))


def _key(target: str) -> str:
    return hashlib.sha256(target.encode()).hexdigest()[:16]


@dataclass
class PartitionRecord:
    number: int
    start_bytes: int
    size_bytes: int
    fstype: str | None
    label: str | None
    skipped: str | None  # why it is not mounted, or None
    name: str | None = None  # an LVM logical volume's VG-LV; else it is p<number>
    backing: str | None = None  # the file its loop devices are on, if not the image:
    # a volume the mount daemon joins from several ranges (MNT/.backupfs/volumes/NAME)

    @property
    def shown(self) -> str:
        """Its directory under TARGET, and its name in messages."""
        return self.name or f"p{self.number}"


@dataclass
class LoopRecord:
    device: str
    partition: int
    clone: int
    start_bytes: int
    backing: str | None = None  # the file it is on, if not the image


@dataclass
class MountRecord:
    path: str
    device: str
    partition: int
    clone: int
    fstype: str
    options: str


@dataclass
class Attachment:
    target: str
    image: str
    clones: int
    created_target: bool
    partitions: list[PartitionRecord] = field(default_factory=list)
    loops: list[LoopRecord] = field(default_factory=list)
    mounts: list[MountRecord] = field(default_factory=list)
    complete: bool = False
    target_mode: int | None = None  # an existing TARGET's mode before attach, for detach

    @property
    def key(self) -> str:
        return _key(self.target)

    @property
    def private_dir(self) -> Path:
        """Where the mounts of clones 1..N-1 live; users never need to look there."""
        return run_dir() / "clones" / self.key

    def mount_path(self, clone: int, partition: int) -> str:
        """Where clone `clone` of partition `partition` is mounted: the only places that
        detach unmounts or removes."""
        base = self.target if clone == 0 else str(self.private_dir / f"c{clone}")
        shown = next((p.shown for p in self.partitions if p.number == partition), None)
        return os.path.join(base, shown or f"p{partition}")

    def clone_mounts(self, partition: int) -> list[MountRecord]:
        return sorted((m for m in self.mounts if m.partition == partition), key=lambda m: m.clone)


def state_path(target: str) -> Path:
    return run_dir() / "attach" / f"{_key(target)}.json"


def _refuse_untrusted(what: str, path: Path, st: os.stat_result) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise UserError(
            f"{what} {path} is owned by uid {st.st_uid}, not by root or you: not trusting it"
        )
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        raise UserError(
            f"{what} {path} is writable by group or others (mode {mode:04o}): not trusting it"
        )


def _trusted_dir(path: Path, create: bool) -> bool:
    """Check `path` (made 0700 first with `create`) as a directory of the run directory;
    False if it does not exist. OSErrors other than its absence propagate."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"run directory {path} is not a directory: not trusting it")
    _refuse_untrusted("run directory", path, st)
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, 0o700)  # readable by others: it lists the clones' mounts
    return True


def _subdir(name: str, create: bool) -> Path | None:
    """RUN_DIR/name once both are checked (and made, with `create`); None if absent."""
    top = run_dir()
    if create:
        top.parent.mkdir(parents=True, exist_ok=True)
    if not _trusted_dir(top, create) or not _trusted_dir(top / name, create):
        return None
    return top / name


def _made_subdir(name: str) -> Path:
    try:
        path = _subdir(name, create=True)
    except OSError as exc:
        raise UserError(f"cannot use the run directory {run_dir()}: {exc.strerror}") from None
    assert path is not None
    return path


def clones_dir() -> Path:
    """RUN_DIR/clones, checked (made 0700 if absent): the clones' private mounts go under it."""
    return _made_subdir("clones")


def save(att: Attachment) -> None:
    path = _made_subdir("attach") / f"{att.key}.json"
    try:
        _write_private(path, json.dumps(asdict(att), indent=1).encode())
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None


def _write_private(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path` (0600 whatever the umask), fsync, rename
    over it: a reader or a crash sees the old record or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with open(os.open(tmp, flags, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _from_dict(doc: dict[str, Any]) -> Attachment:
    return Attachment(
        target=doc["target"],
        image=doc["image"],
        clones=doc["clones"],
        created_target=doc["created_target"],
        partitions=[PartitionRecord(**p) for p in doc["partitions"]],
        loops=[LoopRecord(**r) for r in doc["loops"]],
        mounts=[MountRecord(**r) for r in doc["mounts"]],
        complete=doc["complete"],
        target_mode=doc.get("target_mode"),
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_loop(device: object) -> bool:
    return isinstance(device, str) and _LOOP_DEVICE.fullmatch(device) is not None


def _is_volume_file(path: object) -> bool:
    return (
        isinstance(path, str)
        and os.path.isabs(path)
        and os.path.normpath(path) == path
        and os.path.basename(os.path.dirname(path)) == "volumes"
        and os.path.basename(os.path.dirname(os.path.dirname(path))) == ".backupfs"
    )


def _inconsistency(att: Attachment, path: Path) -> str | None:
    """What makes a record name something other than its own TARGET, private clone
    directory and loop devices, or None."""
    target = att.target
    if (
        not (isinstance(target, str) and os.path.isabs(target))
        or os.path.normpath(target) != target
    ):
        return f"has an unusable TARGET {target!r}"
    if state_path(target) != path:
        return f"is not the record of {target}"
    if not (isinstance(att.image, str) and _is_count(att.clones)):
        return "is malformed"
    if att.target_mode is not None and not (
        _is_count(att.target_mode) and att.target_mode <= 0o7777
    ):
        return "is malformed"
    for part in att.partitions:
        name = part.name
        if name is not None and (
            not isinstance(name, str) or "/" in name or name in ("", ".", "..")
        ):
            return "is malformed"
    for loop in att.loops:
        if not (_is_loop(loop.device) and _is_count(loop.start_bytes)):
            return f"names {loop.device!r}, which is not a loop device"
    for backing in [p.backing for p in att.partitions] + [r.backing for r in att.loops]:
        if backing is not None and not _is_volume_file(backing):
            return f"names {backing!r}, which is not a volume of a mount daemon"
    for m in att.mounts:
        if not (_is_count(m.clone) and _is_count(m.partition) and _is_loop(m.device)):
            return "is malformed"
        if m.path != att.mount_path(m.clone, m.partition):
            return f"names {m.path!r}, outside {target}/p<K> and {att.private_dir}"
    return None


def _read(path: Path) -> Attachment | None:
    """The record at `path` once it is checked (see the module's docstring); None if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = (
            "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be read: {exc.strerror}"
        )
        raise UserError(f"attachment record {path} {why}: not trusting it") from None
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"attachment record {path} is not a regular file: not trusting it")
        _refuse_untrusted("attachment record", path, st)
        data = f.read(RECORD_MAX_BYTES + 1)
    if len(data) > RECORD_MAX_BYTES:
        raise UserError(
            f"attachment record {path} is over {RECORD_MAX_BYTES} bytes: not trusting it"
        )
    try:
        att = _from_dict(json.loads(data))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"{path}: unreadable attachment record ({exc})") from None
    inconsistent = _inconsistency(att, path)
    if inconsistent is not None:
        raise UserError(f"attachment record {path} {inconsistent}: not trusting it")
    return att


def load(target: str) -> Attachment | None:
    try:
        if _subdir("attach", create=False) is None:
            return None
    except OSError as exc:
        raise UserError(f"cannot use the run directory {run_dir()}: {exc.strerror}") from None
    return _read(state_path(target))


def remove(att: Attachment) -> None:
    state_path(att.target).unlink(missing_ok=True)


def load_all() -> list[Attachment]:
    """Every record; none when the run directory is absent or root's (seen by another user)."""
    try:
        directory = _subdir("attach", create=False)
        names = sorted(os.listdir(directory)) if directory is not None else []
    except PermissionError:
        return []
    except OSError as exc:
        raise UserError(f"cannot use the run directory {run_dir()}: {exc.strerror}") from None
    found = []
    for name in names:
        if directory is not None and name.endswith(".json") and not name.startswith("."):
            att = _read(directory / name)
            if att is not None:
                found.append(att)
    return found


@dataclass(frozen=True)
class Location:
    """Where a path lies in an attachment: which partition, on which clone's mount."""

    attachment: Attachment
    partition: PartitionRecord
    mount: MountRecord  # the clone mount that holds the path
    rel: str  # the path relative to that mount ("." for the mount itself)

    def on_every_clone(self) -> list[str]:
        """The same path on each clone of the partition, clone 0 first."""
        mounts = self.attachment.clone_mounts(self.partition.number)
        return [os.path.normpath(os.path.join(m.path, self.rel)) for m in mounts]


def locate(path: str) -> Location | None:
    """The attachment, partition and clone mount holding `path` (on any clone), or None.
    `path` is resolved first, so a symlink to an attached directory counts too."""
    real = os.path.realpath(path)
    for att in load_all():
        for part in att.partitions:
            for mount in att.clone_mounts(part.number):
                if real == mount.path or real.startswith(mount.path + os.sep):
                    return Location(att, part, mount, os.path.relpath(real, mount.path))
    return None
