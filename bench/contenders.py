"""The ways of getting files out of a disk image on an HTTP server that bench/suite.py compares,
by name: CONTENDERS, and DEFAULT, the ones that run without --contenders.

Each contender opens partition 1 of a remote image as a read-only mounted filesystem
(`Opened.root`) and says how it copies files out of it (the interface: contender.py;
backupfs, attached or plainly mounted: backupfs_contender.py; curl+loop, rclone, httpdirfs,
nbdkit: peer_tools.py). `backupfs` is the attach way (`backupfs attach`, `backupfs
restore`); `backupfs-plain` and the FUSE peers are the plain-mount way (the image file in a
FUSE mount, loop-mounted read-only by the suite, `cp -a`); the table's `access` column
says which.

Every resource it makes (FUSE mounts, loop devices, mounts, processes, downloaded files)
goes on the caller's ExitStack the moment it exists, so a failure or Ctrl-C anywhere undoes
exactly what was made. Processes are stopped by the PID this code started; nothing is
killed by name.

Adding a row is one entry in CONTENDERS, e.g. `Backupfs("backupfs-noplan",
restore_args=("--no-plan",))` (there: restore without a read plan), or with other
mount_options / attach_args; DEFAULT says which rows run without --contenders.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from backupfs_contender import Backupfs, BackupfsPlain
from contender import Contender, Opened
from peer_tools import Download, Httpdirfs, Nbdfuse, Rclone

CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in [
        Backupfs(),  # restore with its defaults: a read plan where SRC is in an attachment
        BackupfsPlain(),  # backupfs mount, the image loop-mounted by the suite, cp -a
        Download(),
        Rclone(),
        Httpdirfs(),
        Nbdfuse(),
        # variants, run only when named in --contenders (or added to DEFAULT)
        Backupfs("backupfs-noplan", restore_args=("--no-plan",)),  # plain readahead only
        # `backupfs warm` (--metadata for W5) before W4/W5; a cache that holds the tree
        Backupfs("backupfs+warm", mount_options=("cache_size=1536M",), warm=True),
        # the defaults before 16 connections of 4 MiB (docs/benchmarks.md, connections)
        Backupfs("backupfs-8conn", mount_options=("connections=8", "request_size=8M")),
        Backupfs(
            "backupfs+warm-8conn",
            mount_options=("cache_size=1536M", "connections=8", "request_size=8M"),
            warm=True,
        ),
        Rclone("rclone-off", cache_mode="off"),
        # the plain mount, copies by `backupfs restore` (no attachment, so no read plan)
        BackupfsPlain("backupfs-plain+restore", restore=True),
    ]
}
DEFAULT = ["backupfs", "backupfs-plain", "curl+loop", "rclone", "httpdirfs", "nbdkit"]


def missing_commands(contender: Contender) -> list[str]:
    """The commands `contender` needs that are not installed."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [
        cmd
        for cmd in contender.needs
        if not any(os.access(Path(d) / cmd, os.X_OK) for d in path.split(":"))
    ]


@contextlib.contextmanager
def opened(contender: Contender, url: str, image: str, work: Path) -> Iterator[Opened]:
    with contextlib.ExitStack() as stack:
        yield contender.open(url, image, work, stack)
