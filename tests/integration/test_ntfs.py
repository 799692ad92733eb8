"""NTFS through the userspace driver: a GPT disk whose NTFS partition (made with mkntfs,
filled through ntfs-3g) attaches read-only through a real mount on a kernel without an
NTFS driver, files compared by SHA-256, `status` naming the driver, nothing left after
detach."""

import shutil
import subprocess
from pathlib import Path

import pytest

from backupfs.attach.fstypes import kernel_has
from tests.support.attachment import attach_env, attached, served_store
from tests.support.fsimages import run_tool, sparse_copy
from tests.support.mounting import run_cli, sha256_file
from tests.support.system import mount_points_under, unmount
from tests.support.trees import make_tree

MiB, SECTOR = 1 << 20, 512
pytestmark = [
    pytest.mark.skipif(shutil.which("mkntfs") is None, reason="ntfs-3g is not installed"),
    pytest.mark.skipif(
        kernel_has("ntfs3"), reason="the kernel has ntfs3: the userspace driver is not used"
    ),
]


def _ntfs_image(path: Path, tree: Path, size_mib: int) -> None:
    """An NTFS filesystem holding `tree`'s regular files and directories."""
    run_tool(["truncate", "-s", f"{size_mib}M", str(path)])
    run_tool(["mkntfs", "-q", "-F", "-Q", "-L", "WINC", str(path)])
    mnt = path.with_suffix(".mnt")
    mnt.mkdir()
    run_tool(["ntfs-3g", str(path), str(mnt)])
    try:
        shutil.copytree(tree, mnt / "Users", symlinks=False, ignore_dangling_symlinks=True,
                        dirs_exist_ok=True)  # fmt: skip
    finally:
        unmount(mnt)
        mnt.rmdir()


def test_an_ntfs_partition_attaches_through_ntfs_3g(tmp_path: Path) -> None:
    store, work = tmp_path / "store", tmp_path / "work"
    disk = store / "win01" / "2026-11-20T0300Z" / "disk0.img"
    disk.parent.mkdir(parents=True)
    (work / "serve").mkdir(parents=True)
    sums = make_tree(work / "tree", seed=21, files=16, special=False)
    fs = work / "c.ntfs"
    _ntfs_image(fs, work / "tree", 48)
    run_tool(["truncate", "-s", "52M", str(disk)])
    basic_data = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"  # Windows' basic data partition
    script = f"label: gpt\nstart=2048, size={48 * MiB // SECTOR}, type={basic_data}\n"
    run_tool(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never",
              str(disk)], stdin=script)  # fmt: skip
    sparse_copy(fs, disk, MiB)
    with served_store(store, work / "serve") as served:
        env = attach_env(work / "run")
        image = served.image("win01/2026-11-20T0300Z/disk0.img")
        with attached(image, work / "target", env) as att:
            root = att.target / "p1"
            for rel, digest in sums.items():
                assert sha256_file(root / "Users" / rel) == digest, rel
            status = run_cli("status", env=env)
            assert status.returncode == 0, status.stderr
            line = next(x for x in status.stdout.splitlines() if "p1  ntfs" in x)
            assert line.startswith("  p1  ntfs [WINC]  ") and "mounted by ntfs-3g" in line, line
            options = _mount_options(root)
            assert {"ro", "nosuid", "nodev", "noexec", "nosymfollow"} <= options, options
            with pytest.raises(OSError):
                (root / "new-file").write_text("refused")
        assert mount_points_under(work / "target") == []


def _mount_options(path: Path) -> set[str]:
    out = subprocess.run(["findmnt", "-n", "-o", "VFS-OPTIONS", str(path)], capture_output=True,
                         text=True, timeout=30).stdout  # fmt: skip
    return set(out.strip().split(","))
