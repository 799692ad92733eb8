"""The filesystems on a served disk, found in userspace: its partition table
(plan/parttable.py), then each partition's superblock. ext2/3/4 and xfs are read
(plan/ext4fs.py, plan/xfsmeta.py); any other partition is named in one line and skipped:
`backupfs attach` then `find` reaches it through the kernel's or a FUSE driver."""

import struct
from collections.abc import Callable
from dataclasses import dataclass

from backupfs.errors import FormatError
from backupfs.plan.fsmeta import FsError, FsReader, Read


@dataclass(frozen=True)
class Filesystem:
    partition: str  # "p1", "p5"; "p0" for a filesystem on the whole disk
    kind: str  # "ext4", "xfs"
    start: int
    fs: FsReader


def _kind(read: Read, start: int) -> str | None:
    head = read(start, 4096)
    if head[:4] == b"XFSB":
        return "xfs"
    if len(head) >= 1082 and struct.unpack_from("<H", head, 1080)[0] == 0xEF53:
        return "ext4"
    return None


def _open(kind: str, read: Read, start: int, size: int) -> FsReader:
    if kind == "xfs":
        from backupfs.plan.xfsmeta import Xfs

        return Xfs(read, start, size)
    from backupfs.plan.ext4fs import Ext4Fs

    return Ext4Fs(read, start, size)


def filesystems(read: Read, disk_size: int, say: Callable[[str], None]) -> list[Filesystem]:
    """Every readable filesystem of the disk; the others said and skipped."""
    from backupfs.plan.parttable import read_partitions

    try:
        parts = [(p.number, p.start, p.size) for p in read_partitions(read, disk_size)]
    except FormatError as exc:
        say(f"partition table: {exc}")
        return []
    found = []
    for number, start, size in parts:
        name = f"p{number}"
        kind = _kind(read, start)
        if kind is None:
            say(f"{name}: skipped: not ext2/3/4 or xfs (attach the disk, then find there)")
            continue
        try:
            found.append(Filesystem(name, kind, start, _open(kind, read, start, size)))
        except FsError as exc:
            say(f"{name}: {kind} not readable here: {exc}")
    return found
