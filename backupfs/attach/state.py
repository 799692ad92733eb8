"""What an attachment set up, journalled under the run directory before each step.

The file is rewritten atomically (write, fsync, rename) before every loop device and
mount is created, so a crash at any point leaves a record `backupfs detach` can undo.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backupfs.errors import UserError
from backupfs.linux.atomicfile import write_atomic

RUN_DIR_ENV = "BACKUPFS_RUN_DIR"


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV, "/run/backupfs"))


@dataclass
class PartitionRecord:
    number: int
    start_bytes: int
    size_bytes: int
    fstype: str | None
    label: str | None
    skipped: str | None  # why it is not mounted, or None


@dataclass
class LoopRecord:
    device: str
    partition: int
    clone: int
    start_bytes: int


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

    @property
    def key(self) -> str:
        return hashlib.sha256(self.target.encode()).hexdigest()[:16]

    @property
    def private_dir(self) -> Path:
        """Where the mounts of clones 1..N-1 live; users never need to look there."""
        return run_dir() / "clones" / self.key

    def clone_mounts(self, partition: int) -> list[MountRecord]:
        return sorted((m for m in self.mounts if m.partition == partition), key=lambda m: m.clone)


def state_path(target: str) -> Path:
    return run_dir() / "attach" / f"{hashlib.sha256(target.encode()).hexdigest()[:16]}.json"


def save(att: Attachment) -> None:
    path = state_path(att.target)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(asdict(att), indent=1).encode())


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
    )


def load(target: str) -> Attachment | None:
    path = state_path(target)
    try:
        return _from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path}: unreadable attachment record ({exc})") from None


def remove(att: Attachment) -> None:
    state_path(att.target).unlink(missing_ok=True)


def load_all() -> list[Attachment]:
    found = []
    for path in sorted((run_dir() / "attach").glob("*.json")):
        try:
            found.append(_from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError, KeyError):
            continue
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
