"""The volumes a mount serves under `.backupfs/volumes/`: LVM volumes that are not one
range of one disk (several segments, stripes, several disks of a snapshot), which
`attach` asks for over the plan socket and then loop-mounts like a partition (see
plan/channel.py for the request, docs/design.md for the interface).

A request is the client's word: every area must lie within a disk this mount serves, and
the table holds at most MAX_VOLUMES. A volume's name is its LVM name and a digest of its
layout, so asking again for the same layout (attaching the same snapshot twice, or again
after detach) gives the same file and the table does not grow. Pure data: no I/O.
"""

import hashlib
import json
from collections.abc import Callable

from backupfs.plan.channel import VolumeRequest
from backupfs.store.image import Disk, Image, VirtualDisk, Volume, VolumeRun

MAX_VOLUMES = 1024
FIRST_INODE = (1 << 62) + (1 << 20)  # above the control directory's own files


class VolumeRefused(ValueError):
    """A request the table refuses; its text is one line for the client."""


class VolumeTable:
    def __init__(self) -> None:
        self.by_name: dict[str, Volume] = {}
        self.by_inode: dict[int, Volume] = {}

    def register(self, request: VolumeRequest, find: Callable[[str], Disk | None]) -> Volume:
        """The volume `request` describes, made once; `find` gives the disk a path of the
        mount serves (None for anything else)."""
        layout = json.dumps(request.runs, separators=(",", ":"))
        name = f"{request.name}.{hashlib.sha256(layout.encode()).hexdigest()[:16]}"
        if name in self.by_name:
            return self.by_name[name]
        if len(self.by_name) >= MAX_VOLUMES:
            raise VolumeRefused(f"this mount serves {MAX_VOLUMES} volumes already")
        runs, start = [], 0
        for size, stripe, places in request.runs:
            areas = []
            for path, offset in places:
                disk = find(path)
                if not isinstance(disk, Image | VirtualDisk):
                    raise VolumeRefused(f"no disk {path!r} in this mount")
                if offset + size // len(places) > disk.size_bytes:
                    raise VolumeRefused(f"a run at {offset} lies past the end of {path}")
                areas.append((disk, offset))
            runs.append(VolumeRun(start, size, stripe, tuple(areas)))
            start += size
        volume = Volume(FIRST_INODE + len(self.by_name), name, start, runs)
        self.by_name[name] = self.by_inode[volume.volume_id] = volume
        return volume
