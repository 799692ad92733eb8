"""The teardown helpers in tests/support/system.py do what the fixtures rely on."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.system import (
    is_mounted,
    mount_points_under,
    remove_tree,
    tmpfs_mounted,
    top_fstype,
    unmount,
    unmount_under,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    # mountinfo writes these as \040 and \011
    with tmpfs_mounted(tmp_path / "with space\tand tab") as mnt:
        yield mnt


def test_mounts_are_found_by_their_real_names(tmp_path: Path, tmpfs: Path) -> None:
    assert is_mounted(tmpfs) and top_fstype(tmpfs) == "tmpfs"
    inner = tmpfs / "inner"
    inner.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(inner)], check=True)
    try:
        assert top_fstype(inner) == "ramfs"
        assert mount_points_under(tmp_path) == [str(inner), str(tmpfs)]  # deepest first
        assert mount_points_under(inner) == [str(inner)]
        assert mount_points_under(tmp_path / "with") == []  # a name prefix is not a parent
    finally:
        unmount_under(tmp_path)
    assert not is_mounted(inner) and not is_mounted(tmpfs)
    assert top_fstype(tmpfs) is None


def test_a_busy_mount_is_unmounted_lazily(tmpfs: Path) -> None:
    with open(tmpfs / "held", "w") as held:
        unmount(tmpfs)  # umount: EBUSY; then umount -l
        assert not is_mounted(tmpfs)
        held.write("still writable")  # the filesystem lives on until the file is closed


def test_remove_tree_refuses_to_delete_through_a_mount(tmp_path: Path, tmpfs: Path) -> None:
    (tmpfs / "precious").write_text("x")
    with pytest.raises(RuntimeError, match="still mounted below"):
        remove_tree(tmp_path)
    assert (tmpfs / "precious").read_text() == "x"
    unmount(tmpfs)
    remove_tree(tmp_path)
    assert not tmp_path.exists()
