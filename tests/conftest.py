"""Guard: no test may leave a FUSE mount or a loop device behind.

Only mounts and loop devices under this pytest run's base temp directory count, so two
runs on one machine do not take each other's mounts for leftovers.
"""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _our_mounts(base: str) -> set[str]:
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4]
            if mount_point.startswith(base):
                out.add(mount_point)
    return out


def _our_loop_devices(base: str) -> set[str]:
    proc = subprocess.run(["losetup", "-a"], capture_output=True, text=True, timeout=30)
    return {line.split(":")[0] for line in proc.stdout.splitlines() if base in line}


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    base = str(Path(tmp_path_factory.getbasetemp()).resolve())
    mounts_before, loops_before = _our_mounts(base), _our_loop_devices(base)
    yield
    left_mounts = _our_mounts(base) - mounts_before
    left_loops = _our_loop_devices(base) - loops_before
    for mnt in sorted(left_mounts, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30)
    for dev in left_loops:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
    assert not left_mounts and not left_loops, f"left behind: {left_mounts} {left_loops}"
