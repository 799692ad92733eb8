"""What a new admin hit: DEST that cannot be written, --files-from with a missing path, DEST
modes, umount wording, a non-empty mountpoint, and network errors in plain words."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupfs.errors import EXIT_ERROR, EXIT_PARTIAL, EXIT_STORE
from tests.integration.conftest import Store
from tests.support.attachment import attach_env, attached, served_store
from tests.support.disks import make_disk
from tests.support.fsimages import PartSpec
from tests.support.kernel import needs_filesystems
from tests.support.mounting import mounted, run_cli
from tests.support.system import is_mounted, tmpfs_mounted


def _one_line(result: subprocess.CompletedProcess[str], rc: int) -> str:
    assert result.returncode == rc, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.removeprefix("backupfs: ").rstrip("\n")


def _tree(root: Path) -> dict[str, str]:
    sums = {}
    for rel in ("a.txt", "etc/app.conf", "var/log/app.log"):
        data = os.urandom(5000)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


@pytest.fixture
def tmpfs_ro(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_mounted(tmp_path / "ro", "ro,size=1m") as path:
        yield path


def test_dest_on_a_read_only_filesystem_is_one_line(tmp_path: Path, tmpfs_ro: Path) -> None:
    _tree(tmp_path / "src")
    dest = tmpfs_ro / "dest"
    result = run_cli("restore", str(tmp_path / "src"), str(dest))
    assert _one_line(result, EXIT_ERROR) == (
        f"{dest}: cannot restore into it: Read-only file system"
    )


def test_dest_under_a_file_is_one_line(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    (tmp_path / "afile").write_text("x")
    dest = tmp_path / "afile" / "dest"
    result = run_cli("restore", str(tmp_path / "src"), str(dest))
    assert _one_line(result, EXIT_ERROR) == f"{dest}: cannot restore into it: Not a directory"


def test_files_from_with_a_missing_path_restores_the_rest(tmp_path: Path) -> None:
    sums = _tree(tmp_path / "src")
    listing = tmp_path / "list"
    listing.write_text("a.txt\nno/such/file\netc/app.conf\n")
    dest = tmp_path / "dest"
    result = run_cli("restore", "--files-from", str(listing), str(tmp_path / "src"), str(dest))
    assert result.returncode == EXIT_PARTIAL, result
    assert result.stderr.splitlines() == [
        "backupfs: failed: no/such/file: No such file or directory",
        "backupfs: 1 file failed, the rest was restored",
    ]
    for rel in ("a.txt", "etc/app.conf"):
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == sums[rel]
    assert not (dest / "var").exists()


def test_dest_directories_made_for_files_follow_the_umask(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    dest = tmp_path / "out" / "logs"
    umask = os.umask(0o022)
    try:
        result = run_cli("restore", str(tmp_path / "src/a.txt"), str(dest))
    finally:
        os.umask(umask)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("restored 1 file (")
    assert (dest / "a.txt").exists()
    assert oct(dest.stat().st_mode & 0o777) == oct(0o755)  # as mkdir -p would make it


def test_umount_of_something_else_says_so(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert _one_line(run_cli("umount", str(plain)), EXIT_ERROR) == (
        f"{plain} is not a backupfs mount"
    )


@needs_filesystems("ext4")
def test_umount_names_the_attachments_that_hold_it(tmp_path: Path) -> None:
    store = tmp_path / "store"
    rel = "h1/2026-11-20/disk.img"
    (store / rel).parent.mkdir(parents=True)
    make_disk(store / rel, "none", [PartSpec("ext4", 16)])
    env = attach_env(tmp_path / "run")
    with (
        served_store(store, tmp_path) as served,
        attached(served.image(rel), tmp_path / "target", env) as att,
    ):
        result = run_cli("umount", str(served.mnt), env=env)
        assert _one_line(result, EXIT_ERROR) == (
            f"{served.mnt} is busy: images in it are attached (backupfs detach {att.target} first)"
        )
        assert is_mounted(served.mnt)


def test_a_non_empty_mountpoint_is_refused_unless_asked(store: Store, mnt: Path) -> None:
    (mnt / "keep.txt").write_text("mine")
    result = run_cli("mount", store.url, str(mnt))
    assert _one_line(result, EXIT_ERROR) == (
        f"mountpoint {mnt} is not empty: the mount would hide its files "
        "(-o nonempty mounts over them anyway)"
    )
    assert not is_mounted(mnt)
    with mounted(store.url, mnt, "nonempty"):
        assert not (mnt / "keep.txt").exists()
    assert (mnt / "keep.txt").read_text() == "mine"


def test_https_to_an_http_port_says_so(store: Store) -> None:
    url = store.url.replace("http://", "https://")
    message = _one_line(run_cli("ls", "-o", "retries=0", url), EXIT_STORE)
    where = url.removeprefix("https://").rstrip("/")
    assert message == (
        f"cannot read {url}backupfs-store.json: {where} does not speak TLS "
        "(is this an http port? try http://)"
    )


def test_an_unknown_host_says_so() -> None:
    url = "https://no-such-host.invalid/store/"
    message = _one_line(run_cli("ls", "-o", "retries=0", url), EXIT_STORE)
    assert message in (
        f"cannot read {url}backupfs-store.json: unknown host no-such-host.invalid (check the URL)",
        # a resolver that cannot be reached at all (no network) answers "try again"
        f"cannot read {url}backupfs-store.json: cannot resolve no-such-host.invalid "
        "(name service not answering)",
    )
