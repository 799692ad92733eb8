"""Asking a mount daemon for a volume: an LVM volume that is not one range of one disk,
which the daemon serves as `.backupfs/volumes/NAME` (mount/volumes.py) and `attach`
loop-mounts like a partition. The request and reply are plan/channel.py's."""

import os
import re

from backupfs.attach.partitions import Run
from backupfs.errors import UserError
from backupfs.plan.channel import MAX_LINE_BYTES, ChannelError, decode, encode
from backupfs.plan.readplan import backupfs_mount, connect

REQUEST_TIMEOUT_S = 30.0
_PATH = re.compile(r"\.backupfs/volumes/[A-Za-z0-9+_.-]+")


def serve_volume(name: str, runs: tuple[Run, ...]) -> str:
    """The path of the file the daemon serves for volume `name`; UserError, with the
    reason, when no daemon serves all of its disks or the daemon refuses."""
    mounts = {disk: backupfs_mount(disk) for run in runs for disk, _ in run.areas}
    points = {m[0] for m in mounts.values() if m is not None}
    if None in mounts.values() or len(points) != 1:
        raise UserError(
            "its segments must be joined, and without device-mapper only the mount daemon "
            "does that: attach the image from a backupfs mount"
        )
    (mountpoint,) = points
    rel = {disk: m[1] for disk, m in mounts.items() if m is not None}
    message = {
        "volume": name,
        "runs": [[r.size_bytes, r.stripe_bytes, [[rel[d], off] for d, off in r.areas]]
                 for r in runs],
    }  # fmt: skip
    try:
        sock = connect(mountpoint, REQUEST_TIMEOUT_S)
    except OSError as exc:
        raise UserError(f"the daemon of {mountpoint} does not answer: {exc}") from None
    try:
        sock.sendall(encode(message))
        line = sock.makefile("rb").readline(MAX_LINE_BYTES + 1)
        reply = decode(line.rstrip(b"\n"))
    except (OSError, ChannelError) as exc:
        raise UserError(f"the daemon of {mountpoint} gave no volume: {exc}") from None
    finally:
        sock.close()
    error, path = reply.get("error"), reply.get("path")
    if error is not None:
        raise UserError(f"the mount daemon refused to join its segments: {str(error)[:300]}")
    if not isinstance(path, str) or not _PATH.fullmatch(path):
        raise UserError(f"the daemon of {mountpoint} gave no volume")
    return os.path.join(mountpoint, path)
