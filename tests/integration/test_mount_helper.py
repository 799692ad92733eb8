"""mount(8) -> mount.fuse3 -> `backupfs SOURCE DIR -o OPTS`, from the command line and fstab."""

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import SMALL, Store
from tests.support.kernel import needs_filesystems
from tests.support.mounting import daemon_pids, kill_daemons, sha256_file
from tests.support.system import is_mounted, top_fstype, unmount

DISK = next(iter(SMALL))


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def helper_mnt(mnt: Path) -> Iterator[Path]:
    """A mountpoint whose daemon (started by mount(8), so not our child) is cleaned up."""
    try:
        yield mnt
    finally:
        unmount(mnt, fuse=True)
        kill_daemons(mnt)


def _wait_for_exit(mountpoint: Path) -> None:
    deadline = time.monotonic() + 15
    while daemon_pids(mountpoint):
        assert time.monotonic() < deadline, "daemon still running after umount"
        time.sleep(0.1)


def test_mount_t_fuse_backupfs_then_umount(store: Store, helper_mnt: Path) -> None:
    result = _mount(
        "-t", "fuse.backupfs", store.url, str(helper_mnt),
        "-o", "ro,nodev,nosuid,_netdev,cache_size=64M,connections=4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # mount(8) returned: the mount is ready, with no retry loop needed here.
    assert top_fstype(str(helper_mnt)) == "fuse.backupfs"
    assert sha256_file(helper_mnt / DISK) == store.sha256[DISK]
    assert daemon_pids(helper_mnt), "no daemon left running after mount returned"
    umount = subprocess.run(["umount", str(helper_mnt)], capture_output=True, text=True)
    assert umount.returncode == 0, umount.stderr
    assert not is_mounted(helper_mnt)
    _wait_for_exit(helper_mnt)


def test_fstab_line_mounts(store: Store, helper_mnt: Path, tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    options = (
        "ro,noauto,nofail,x-systemd.automount,x-systemd.idle-timeout=10min,_netdev,cache_size=64M"
    )
    fstab.write_text(f"# test fstab\n{store.url} {helper_mnt} fuse.backupfs {options} 0 0\n")
    result = _mount("-T", str(fstab), str(helper_mnt))
    assert result.returncode == 0, result.stderr
    assert top_fstype(str(helper_mnt)) == "fuse.backupfs"
    assert sha256_file(helper_mnt / DISK) == store.sha256[DISK]
    assert subprocess.run(["umount", str(helper_mnt)]).returncode == 0
    _wait_for_exit(helper_mnt)


def test_unknown_option_fails_in_one_line(store: Store, helper_mnt: Path) -> None:
    result = _mount("-t", "fuse.backupfs", store.url, str(helper_mnt), "-o", "ro,cache_sise=1G")
    assert result.returncode != 0
    assert result.stderr.strip() == "backupfs: unknown mount option 'cache_sise'"
    assert not is_mounted(helper_mnt)


def test_unreachable_store_fails_without_mounting(helper_mnt: Path) -> None:
    from tests.support.nginx import free_port

    url = f"http://127.0.0.1:{free_port()}/store/"
    result = _mount("-t", "fuse.backupfs", url, str(helper_mnt), "-o", "retries=0,timeout=5")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backupfs: cannot read "), result.stderr
    assert not is_mounted(helper_mnt)


@needs_filesystems("autofs")
def test_mounts_over_a_systemd_automount_trigger(store: Store, helper_mnt: Path) -> None:
    """x-systemd.automount leaves an autofs mount at the mountpoint; mounting goes on top."""
    read_end, write_end = os.pipe()
    try:
        options = f"fd={write_end},pgrp={os.getpgrp()},minproto=5,maxproto=5,direct"
        autofs = subprocess.run(
            ["mount", "-t", "autofs", "-o", options, "systemd-1", str(helper_mnt)],
            pass_fds=(write_end,), capture_output=True, text=True,
        )  # fmt: skip
        assert autofs.returncode == 0, autofs.stderr
        result = _mount("-t", "fuse.backupfs", store.url, str(helper_mnt), "-o", "ro")
        assert result.returncode == 0, result.stderr
        assert top_fstype(str(helper_mnt)) == "fuse.backupfs"
        assert sha256_file(helper_mnt / DISK) == store.sha256[DISK]
        assert subprocess.run(["umount", str(helper_mnt)]).returncode == 0
        _wait_for_exit(helper_mnt)
        assert top_fstype(str(helper_mnt)) == "autofs"
    finally:
        unmount(helper_mnt, fuse=True)
        subprocess.run(["umount", str(helper_mnt)], capture_output=True)
        os.close(read_end)
        os.close(write_end)
