"""What is mounted where, read from /proc/self/mountinfo."""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    source: str
    dev: str  # major:minor


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mounts(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            entries.append(MountEntry(_unescape(fields[4]), rest[0], _unescape(rest[1]), fields[2]))
    return entries


def top_fstype(path: str) -> str | None:
    """The type of the topmost mount at `path`, or None. Read from mountinfo, so a dead
    FUSE mount (where stat() fails with ENOTCONN) counts too."""
    real = os.path.realpath(path)
    types = [m.fstype for m in read_mounts() if m.mount_point == real]
    return types[-1] if types else None


def read_mounts_dev(mount_point: str) -> str | None:
    """major:minor of what is mounted at `mount_point` (the last mount there wins)."""
    devs = [m.dev for m in read_mounts() if m.mount_point == mount_point]
    return devs[-1] if devs else None
