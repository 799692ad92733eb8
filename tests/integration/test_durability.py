"""Durability shown, not assumed: a restore onto ext4 over a crash-simulating disk
(tests/support/crashdisk.py) that keeps only what the kernel flushed, then a power cut."""

import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from tests.support.crashdisk import CrashDisk
from tests.support.mounting import run_cli

ATTEMPTS = 5  # an outside sync() on the machine flushes our disk too: try again


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "src"
    rng = random.Random(42)
    sums = {}
    for i in range(60):
        rel = f"d{i % 4}/f{i:03}.bin"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(1, 600_000))
        (root / rel).write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return root, sums


def _digests(root: Path) -> dict[str, str]:
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}  # fmt: skip


def _cp(src: Path, dest: Path) -> None:
    subprocess.run(["cp", "-a", str(src), str(dest)], check=True, timeout=120)


@pytest.mark.parametrize("how", ["backupfs restore", "cp -a + backupfs flush"])
def test_restored_files_survive_a_power_cut(
    how: str, tmp_path: Path, source: tuple[Path, dict[str, str]]
) -> None:
    src, sums = source
    with CrashDisk(tmp_path / "crash", size_mib=128) as disk:
        dest = disk.mount_fs() / "restored"
        if how == "backupfs restore":
            result = run_cli("restore", str(src), str(dest))
        else:
            _cp(src, dest)
            result = run_cli("flush", str(dest))
        assert result.returncode == 0, result.stderr
        assert "syncfs" in result.stdout
        disk.power_cut()
        root = disk.remount_after_crash()
        assert _digests(root / "restored") == sums
        disk.unmount_after_crash()
        disk.fsck()


def test_cp_without_flush_loses_files(tmp_path: Path, source: tuple[Path, dict[str, str]]) -> None:
    """The check above can fail: without a flush, the same copy does not survive."""
    src, sums = source
    for attempt in range(ATTEMPTS):
        with CrashDisk(tmp_path / f"crash{attempt}", size_mib=128) as disk:
            dest = disk.mount_fs() / "restored"
            fsyncs_at_mount = disk.stats()["fsyncs"]
            _cp(src, dest)
            cut = disk.power_cut()
            if cut["fsyncs_before_cut"] != fsyncs_at_mount:
                continue  # someone's sync() flushed our disk: not the case under test
            got = _digests(disk.remount_after_crash() / "restored")
            assert got != sums
            lost = [rel for rel in sums if got.get(rel) != sums[rel]]
            assert lost, "no file was lost or damaged"
            return
    pytest.fail(f"all {ATTEMPTS} attempts were flushed by an outside sync()")
