"""tests/support/crashdisk.py tells durable data from data that only looked written.

Each case writes files to ext4 on a CrashDisk, cuts the power, remounts the durable image the
way a reboot would and compares SHA-256 sums; e2fsck then checks the image is consistent
(ext4 honours flushes, so a disk that keeps exactly what was flushed must leave it clean).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from tests.support.crashdisk import CrashDisk
from tests.support.kernel import needs_filesystems, needs_root_fuse_loop
from tests.support.system import syncfs, write_back

pytestmark = [needs_root_fuse_loop, needs_filesystems("ext4")]

SIZE_MIB = 128
FILES = 50
MAX_FILE = 1 << 20
# A sync() by any other process on the machine flushes our ext4 too; a case that needs "no
# flush since mount" notices it by the daemon's fsync counter and starts over.
ATTEMPTS = 5


def _write_files(root: Path, seed: int, count: int = FILES, prefix: str = "f") -> dict[str, str]:
    """`count` files of random sizes (1 B .. 1 MiB) and bytes, plain writes; {name: sha256}."""
    rng = random.Random(seed)
    out = {}
    for i in range(count):
        data = rng.randbytes(rng.randint(1, MAX_FILE))
        name = f"{prefix}{i:03d}.bin"
        with open(root / name, "wb") as f:
            f.write(data)
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def _write_files_fsync(directory: Path, seed: int, count: int = FILES) -> dict[str, str]:
    """Like _write_files, with fsync of each file and then of its directory."""
    rng = random.Random(seed)
    out = {}
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            data = rng.randbytes(rng.randint(1, MAX_FILE))
            name = f"s{i:03d}.bin"
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(dir_fd)
            out[name] = hashlib.sha256(data).hexdigest()
    finally:
        os.close(dir_fd)
    return out


def _write_back(root: Path, names: Iterable[str]) -> None:
    """Push the files' data pages to the disk without any flush (sync_file_range(2): writes
    the data, commits no journal, sends no flush)."""
    for name in names:
        write_back(root / name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _survivors(root: Path, expected: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(intact, missing, wrong) names."""
    intact, missing, wrong = [], [], []
    for name, digest in expected.items():
        path = root / name
        if not path.exists():
            missing.append(name)
        elif hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            intact.append(name)
        else:
            wrong.append(name)
    return intact, missing, wrong


def _check_consistent(disk: CrashDisk) -> None:
    disk.unmount_after_crash()
    disk.fsck()


@pytest.mark.parametrize("written_back", [False, True], ids=["in-page-cache", "written-back"])
def test_unsynced_writes_are_lost(tmp_path: Path, written_back: bool) -> None:
    """Plain writes, no sync: the cut loses them, and the test can see it. written-back: the
    data did reach the disk's volatile buffer first (sync_file_range), but nothing flushed."""
    for attempt in range(ATTEMPTS):
        with CrashDisk(tmp_path / f"try{attempt}", SIZE_MIB) as disk:
            fs = disk.mount_fs()
            fsyncs_at_mount = disk.stats()["fsyncs"]
            expected = _write_files(fs, seed=1)
            if written_back:
                _write_back(fs, expected)
            cut = disk.power_cut()
            if cut["fsyncs_before_cut"] != fsyncs_at_mount:
                continue  # someone's sync() flushed us between mount and cut: try again
            if written_back:  # the data was in the daemon's buffer, and the cut dropped it
                assert cut["pages_dropped_at_cut"] >= FILES, cut
            after = disk.remount_after_crash()
            intact, missing, wrong = _survivors(after, expected)
            assert missing or wrong, "nothing was lost: the power cut kept unsynced data"
            # No flush reached the disk after mount, so not a trace of the files is left.
            assert not intact and not wrong and len(missing) == FILES
            assert sorted(os.listdir(after)) == ["lost+found"]
            _check_consistent(disk)
            return
    pytest.fail(f"every one of {ATTEMPTS} attempts was flushed by an outside sync()")


@pytest.mark.parametrize("sync", [syncfs, lambda _: os.sync()], ids=["syncfs", "sync"])
def test_synced_writes_survive(tmp_path: Path, sync: Callable[[Path], None]) -> None:
    """Plain writes, then syncfs(2) / sync(2): every file survives the cut byte for byte."""
    with CrashDisk(tmp_path, SIZE_MIB) as disk:
        fs = disk.mount_fs()
        persisted_at_mount = disk.stats()["pages_persisted"]
        expected = _write_files(fs, seed=2)
        sync(fs)
        cut = disk.power_cut()
        assert cut["pages_persisted"] - persisted_at_mount >= FILES, cut  # the sync reached us
        after = disk.remount_after_crash()
        intact, missing, wrong = _survivors(after, expected)
        assert (missing, wrong) == ([], [])
        assert len(intact) == FILES
        _check_consistent(disk)


def test_fsynced_files_survive(tmp_path: Path) -> None:
    """fsync of each file and its directory makes them durable; files written after the last
    fsync, with none of their own, are lost."""
    for attempt in range(ATTEMPTS):
        with CrashDisk(tmp_path / f"try{attempt}", SIZE_MIB) as disk:
            fs = disk.mount_fs()
            sub = fs / "sub"
            sub.mkdir()
            _fsync_dir(fs)
            expected = _write_files_fsync(sub, seed=3)
            fsyncs_after_last = disk.stats()["fsyncs"]
            unsynced = _write_files(sub, seed=4, count=5, prefix="late")
            cut = disk.power_cut()
            after = disk.remount_after_crash()
            intact, missing, wrong = _survivors(after / "sub", expected)
            assert (missing, wrong) == ([], [])
            assert len(intact) == FILES
            late_intact, late_missing, late_wrong = _survivors(after / "sub", unsynced)
            _check_consistent(disk)
            if cut["fsyncs_before_cut"] != fsyncs_after_last:
                continue  # an outside sync() flushed the late files: check them again
            assert late_intact == [] and len(late_missing) == 5, (late_intact, late_wrong)
            return
    pytest.fail(f"every one of {ATTEMPTS} attempts was flushed by an outside sync()")
