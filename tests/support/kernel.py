"""What the running kernel can do, and skip markers for tests that need it.

A test that mounts a filesystem type needs the kernel's driver for it: `/proc/filesystems`
lists the types the running kernel has (the reference machine's kernel has no modules, so
what is not listed there cannot be mounted: autofs, vfat, ntfs, iso9660 on some machines).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest


@cache
def kernel_filesystems() -> frozenset[str]:
    """Filesystem types the running kernel can mount now."""
    lines = Path("/proc/filesystems").read_text().splitlines()
    return frozenset(line.split()[-1] for line in lines if line.strip())


def missing_filesystems(*fstypes: str) -> list[str]:
    return [name for name in fstypes if name not in kernel_filesystems()]


def needs_filesystems(*fstypes: str) -> pytest.MarkDecorator:
    """Skip, saying which, where the kernel has no driver for one of `fstypes`."""
    missing = missing_filesystems(*fstypes)
    return pytest.mark.skipif(
        bool(missing), reason=f"the running kernel has no {', '.join(missing)} driver"
    )


needs_root_fuse_loop = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"),
    reason="needs root, /dev/fuse and loop devices",
)
