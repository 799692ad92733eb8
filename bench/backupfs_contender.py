"""backupfs as a contender in the suite, two ways:

- Backupfs: `backupfs mount` + `backupfs attach`, files copied out with `backupfs restore`,
  optionally `backupfs warm` before the scans;
- BackupfsPlain: only `backupfs mount`; the suite loop-mounts the image file itself, as it
  does for the peers' FUSE files, and copies with `cp -a` + `sync -f` (or, as a variant,
  `backupfs restore`, which finds no attachment there and so has no read plan).

Variants (other mount options, attach or restore arguments) are instances with another
name, listed in contenders.py.
"""

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from common import run_logged
from contender import Cmd, Contender, Opened, pid_metrics
from peer_tools import LoopMounted

from tests.support.mounting import daemon_pids, mounted

BACKUPFS = [sys.executable, "-m", "backupfs"]


class Backupfs(Contender):
    """`backupfs mount` + `backupfs attach` (defaults: 4 loop clones), copies with `backupfs
    restore` (durable: one syncfs at the end); W3 with `--files-from`."""

    needs = ("fusermount3", "losetup", "sfdisk", "blkid")
    access = "attach"

    def __init__(
        self,
        name: str = "backupfs",
        mount_options: tuple[str, ...] = (),
        attach_args: tuple[str, ...] = (),
        restore_args: tuple[str, ...] = (),
        warm: bool = False,
    ) -> None:
        self.name = name
        self.warm = warm  # `backupfs warm` before W4 and W5
        self.mount_options = mount_options
        self.attach_args = attach_args
        self.restore_args = restore_args

    def describe(self) -> str:
        opts = ["-o", ",".join(self.mount_options)] if self.mount_options else []
        return "; ".join(
            " ".join(words)
            for words in (
                ["backupfs mount", *opts, "URL MNT"],
                ["backupfs attach", *self.attach_args, "MNT/IMAGE TARGET"],
                ["backupfs restore", *self.restore_args, "SRC... DEST"],
                *([["backupfs warm [--metadata] TARGET/p1 before W4 [W5]"]] if self.warm else []),
            )
        )

    def open(self, url: str, image: str, work: Path, stack: contextlib.ExitStack) -> Opened:
        mnt, target = work / "mnt", work / "attached"
        mnt.mkdir(exist_ok=True)
        env = {**os.environ, "BACKUPFS_RUN_DIR": str(work / "run")}
        daemon = stack.enter_context(mounted(url, mnt, *self.mount_options))
        stack.callback(self._detach, target, env)  # also undoes an attach that failed halfway
        run_logged(
            [*BACKUPFS, "attach", *self.attach_args, str(mnt / image), str(target)],
            timeout=600,
            env=env,
        )
        return Opened(target / "p1", env, daemon_metrics(daemon.pid, mnt))

    @staticmethod
    def _detach(target: Path, env: dict[str, str]) -> None:
        run_logged([*BACKUPFS, "detach", str(target)], timeout=600, env=env)

    def before_scan(self, root: Path, metadata_only: bool) -> list[Cmd]:
        if not self.warm:
            return []
        return [Cmd([*BACKUPFS, "warm", *(["--metadata"] if metadata_only else []), str(root)])]

    def _restore(self, srcs: list[str], dest: Path) -> Cmd:
        return Cmd([*BACKUPFS, "restore", *self.restore_args, *srcs, str(dest)])

    def copy_file(self, src: Path, dest_dir: Path) -> list[Cmd]:
        return [self._restore([str(src)], dest_dir)]

    def copy_tree(self, src: Path, dest: Path) -> list[Cmd]:
        return [self._restore([str(src)], dest)]

    def copy_files(
        self, root: Path, rels: list[str], dest: Path
    ) -> tuple[list[Cmd], Callable[[], dict[str, Path]]]:
        """`backupfs restore --files-from`, like `cp --parents` or `rsync --files-from`."""
        listing = dest.parent / f"{dest.name}.files"
        listing.write_text("".join(f"{rel}\n" for rel in rels))
        cmd = Cmd([*BACKUPFS, "restore", *self.restore_args, "--files-from", str(listing),
                   str(root), str(dest)])  # fmt: skip
        return [cmd], lambda: {rel: dest / rel for rel in rels}


def daemon_metrics(pid: int, mnt: Path) -> Callable[[], tuple[float, float]]:
    """CPU seconds and peak RSS of the mount daemon: the `backupfs mount -f` this code
    started, and any other backupfs process serving `mnt` (daemon_pids: by command line)."""
    return pid_metrics(lambda: sorted({pid, *daemon_pids(mnt)}))


class BackupfsPlain(LoopMounted):
    """`backupfs mount` only, used as a plain FUSE filesystem, the way rclone, httpdirfs
    and nbdfuse are: the suite reads the GPT of MNT/IMAGE with `sfdisk --json`, puts one
    read-only buffered loop device on partition 1 (`losetup -f --show -r --offset
    --sizelimit`) and mounts it `ro,noload`. An admin with only a mounted image copies
    with the tools at hand, so W1-W3 are `cp -a` (W3: `cp -a --parents`) + `sync -f`, the
    commands the peers run; with restore=True (a variant) `backupfs restore` copies
    instead, without a read plan (a plain loop mount is no attachment it could plan for)."""

    needs = ("fusermount3", *LoopMounted.loop_needs)

    def __init__(
        self,
        name: str = "backupfs-plain",
        mount_options: tuple[str, ...] = (),
        restore: bool = False,
    ) -> None:
        self.name = name
        self.mount_options = mount_options
        self.restore = restore
        # backupfs restore's commands, for restore=True
        self.restorer = Backupfs(name, mount_options) if restore else None

    def describe(self) -> str:
        opts = ["-o", ",".join(self.mount_options)] if self.mount_options else []
        copy = "backupfs restore SRC... DEST" if self.restore else "cp -a SRC DEST; sync -f DEST"
        return "; ".join(
            [
                " ".join(["backupfs mount", *opts, "URL MNT"]),
                "losetup -f --show -r --offset --sizelimit MNT/IMAGE",
                "mount -o ro,noload",
                copy,
            ]
        )

    def image_file(
        self, url: str, image: str, work: Path, stack: contextlib.ExitStack
    ) -> tuple[Path, Callable[[], tuple[float, float]]]:
        mnt = work / "mnt"
        mnt.mkdir(exist_ok=True)
        daemon = stack.enter_context(mounted(url, mnt, *self.mount_options))
        return mnt / image, daemon_metrics(daemon.pid, mnt)

    def open(self, url: str, image: str, work: Path, stack: contextlib.ExitStack) -> Opened:
        opened = super().open(url, image, work, stack)
        opened.env = {**os.environ, "BACKUPFS_RUN_DIR": str(work / "run")}
        return opened

    def copy_file(self, src: Path, dest_dir: Path) -> list[Cmd]:
        if self.restorer:
            return self.restorer.copy_file(src, dest_dir)
        return super().copy_file(src, dest_dir)

    def copy_tree(self, src: Path, dest: Path) -> list[Cmd]:
        if self.restorer:
            return self.restorer.copy_tree(src, dest)
        return super().copy_tree(src, dest)

    def copy_files(
        self, root: Path, rels: list[str], dest: Path
    ) -> tuple[list[Cmd], Callable[[], dict[str, Path]]]:
        if self.restorer:
            return self.restorer.copy_files(root, rels, dest)
        return super().copy_files(root, rels, dest)
