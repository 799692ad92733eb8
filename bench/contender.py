"""What a contender in the suite is: a way to make partition 1 of a remote disk image a
read-only mounted filesystem (`Opened`), and the commands it copies files out with.

The concrete contenders are in backupfs_contender.py (backupfs itself, attached or plainly
mounted) and peer_tools.py (curl+loop, rclone, httpdirfs, nbdkit); contenders.py lists them
by name. `Contender.access` says which of the ways in ACCESS a contender takes.
"""

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from common import cpu_seconds, peak_rss_mib

ACCESS = {
    "attach": "`backupfs attach`: backupfs makes the loop devices (clones) and mounts",
    "plain": "plain mount: the image is a file in a FUSE mount; the suite puts one read-only "
    "loop device on it (`losetup -r --offset --sizelimit`) and mounts that `ro,noload`",
    "download": "the whole image downloaded to local disk first, then the same loop mount",
}


class Cmd(NamedTuple):
    argv: list[str]
    cwd: Path | None = None


@dataclass
class Opened:
    """A contender's view of partition 1 of the image, mounted read-only at `root`."""

    root: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    # CPU seconds and peak RSS (MiB) of whatever serves the data; read before teardown
    metrics: Callable[[], tuple[float, float]] = lambda: (float("nan"), float("nan"))


class Contender:
    name = ""
    needs: tuple[str, ...] = ()  # commands that must be installed
    # How it reaches the files (a column of the table, see ACCESS): "attach", "plain" or
    # "download"
    access = ""

    def describe(self) -> str:
        """One line for the report: the exact way this contender is set up."""
        raise NotImplementedError

    def open(self, url: str, image: str, work: Path, stack: contextlib.ExitStack) -> Opened:
        """Make partition 1 of `url + image` readable; register every undo step on `stack`."""
        raise NotImplementedError

    def before_scan(self, root: Path, metadata_only: bool) -> list[Cmd]:
        """Commands run before W4 (grep, all data) and W5 (ls -lR, metadata only)."""
        return []

    # How files are copied out: commands, run in order. Results: the file lands in
    # dest_dir/src.name; the tree becomes dest; copy_files says where each file went.
    def copy_file(self, src: Path, dest_dir: Path) -> list[Cmd]:
        return [Cmd(["cp", "--", str(src), f"{dest_dir}/"]), _syncfs(dest_dir)]

    def copy_tree(self, src: Path, dest: Path) -> list[Cmd]:
        return [Cmd(["cp", "-a", "--", str(src), str(dest)]), _syncfs(dest)]

    def copy_files(
        self, root: Path, rels: list[str], dest: Path
    ) -> tuple[list[Cmd], Callable[[], dict[str, Path]]]:
        cmds = [Cmd(["cp", "-a", "--parents", "-t", str(dest), "--", *rels], root), _syncfs(dest)]
        return cmds, lambda: {rel: dest / rel for rel in rels}


def _syncfs(path: Path) -> Cmd:
    """The copy is made durable as `backupfs restore` makes it: one syncfs at the end."""
    return Cmd(["sync", "--file-system", str(path)])


def pid_metrics(pids: Callable[[], list[int]]) -> Callable[[], tuple[float, float]]:
    """CPU seconds (summed) and peak RSS in MiB (summed) of the live processes `pids()`."""

    def read() -> tuple[float, float]:
        live = [pid for pid in pids() if Path(f"/proc/{pid}").exists()]
        return sum(cpu_seconds(p) for p in live), sum(peak_rss_mib(p) for p in live)

    return read
