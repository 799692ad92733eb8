"""A store of disk images served by nginx and mounted by backupfs; an image attached with
`backupfs attach` and detached again, also when the test fails.

    with served_store(store_dir, work) as served, \\
            attached(served.mnt / REL, work / "target", attach_env(work / "run")) as att:
        ...  # att.target / "p1" is the first partition's filesystem

The images themselves are made by the caller (tests/support/disks.py, mkfs, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from backupfs.store.indexer import index_store
from tests.support.mounting import mounted, run_cli
from tests.support.nginx import Nginx


@dataclass(frozen=True)
class ServedStore:
    root: Path  # the store directory nginx serves
    url: str
    mnt: Path  # the backupfs mount of `url`

    def image(self, rel: str) -> Path:
        """An image as backupfs serves it, through the mount."""
        return self.mnt / rel


@contextlib.contextmanager
def served_store(
    root: Path, work: Path, *mount_options: str, index: bool = True
) -> Iterator[ServedStore]:
    """Index the store at `root` (index=False: the caller did), serve it with nginx (its
    files in work/nginx) and mount it with backupfs at work/mnt."""
    if index:
        index_store(root, say=lambda _: None)
    mnt = work / "mnt"
    mnt.mkdir()
    with Nginx(root, work / "nginx") as nginx, mounted(nginx.url, mnt, *mount_options):
        yield ServedStore(root, nginx.url, mnt)


def attach_env(run_dir: Path) -> dict[str, str]:
    """The environment for `backupfs attach/detach/status/restore/warm` with the attach
    journal and the clones' mounts under `run_dir` instead of /run/backupfs."""
    return {**os.environ, "BACKUPFS_RUN_DIR": str(run_dir)}


@dataclass(frozen=True)
class Attachment:
    image: Path
    target: Path
    env: dict[str, str]  # attach_env() of its run directory
    output: str  # what `backupfs attach` printed


@contextlib.contextmanager
def attached(image: Path, target: Path, env: dict[str, str], *args: str) -> Iterator[Attachment]:
    """`backupfs attach [ARGS] IMAGE TARGET`, which must succeed; `backupfs detach TARGET`
    afterwards, which must succeed too."""
    result = run_cli("attach", *args, str(image), str(target), env=env)
    assert result.returncode == 0, result.stderr
    try:
        yield Attachment(image, target, env, result.stdout)
    finally:
        detached = run_cli("detach", str(target), env=env)
        assert detached.returncode == 0, detached.stderr


def sectors_read(env: dict[str, str]) -> dict[str, int]:
    """Sectors read so far from each loop device of the attachment of `env`'s run dir."""
    [att] = json.loads(run_cli("status", "--json", env=env).stdout)
    return {
        loop["device"]: int(
            Path(f"/sys/block/{Path(loop['device']).name}/stat").read_text().split()[2]
        )
        for loop in att["loops"]
    }
