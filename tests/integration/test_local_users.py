"""`backupfs attach` against the image and against other local users: the image cannot
choose a kernel panic, other users cannot read an attachment unless `--share` lets them, a
symlink at TARGET/p<K> never steers a mount, and detach unmounts only what attach mounted.

Images are made here with mke2fs (small, bare filesystems: TARGET/p0) and attached from
local files; no store or FUSE mount is involved.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.attachment import attach_env, attached
from tests.support.kernel import needs_filesystems, needs_root_fuse_loop
from tests.support.mounting import run_cli
from tests.support.nobody import NOBODY
from tests.support.system import is_mounted, mount_points_under, tmpfs_mounted, unmount

pytestmark = [needs_root_fuse_loop, needs_filesystems("ext2", "ext4")]

REPO = Path(__file__).resolve().parents[2]
SECRET = b"root's secret, from the backup\n"


def make_image(path: Path, fstype: str = "ext4", *tune2fs: str) -> Path:
    """A 16 MiB bare `fstype` holding `secret` (0644), with `tune2fs ARGS` applied."""
    tree = path.with_name(path.name + ".tree")
    tree.mkdir()
    (tree / "secret").write_bytes(SECRET)
    (tree / "secret").chmod(0o644)
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        [f"mkfs.{fstype}", "-q", "-F", "-d", str(tree), str(path)], check=True, timeout=60
    )
    if tune2fs:
        subprocess.run(["tune2fs", *tune2fs, str(path)], check=True, capture_output=True)
    shutil.rmtree(tree)
    return path


def _super_options(mount_point: Path) -> list[str]:
    """The filesystem's own options (after ' - ' in mountinfo) of the mount at the path."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == str(mount_point):
            return right.split()[2].split(",")
    raise AssertionError(f"{mount_point} is not mounted")


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=30)


def _one_line(result: subprocess.CompletedProcess[str], rc: int = 1) -> str:
    assert result.returncode == rc, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.removeprefix("backupfs: ").rstrip("\n")


def _loops_on(image: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
    return [line.split(":")[0] for line in out.splitlines()]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own temp tree is 0700): only the modes
    attach gives TARGET and the run directory decide what another user sees in it."""
    work = Path(tempfile.mkdtemp(prefix="bfs-users-"))
    work.chmod(0o755)
    try:
        yield work
    finally:
        for point in mount_points_under(work):
            unmount(point)
        shutil.rmtree(work)


# --- 1: the image cannot ask for a panic -------------------------------------------------


@pytest.mark.parametrize(
    ("fstype", "tune2fs"),
    [
        ("ext4", ["-e", "panic"]),  # the superblock's error behaviour
        # mount options stored in the image (mountinfo names errors= when it is not the
        # superblock's own behaviour, hence -e remount-ro)
        ("ext2", ["-e", "remount-ro", "-E", "mount_opts=errors=panic"]),
    ],
)
def test_an_image_asking_for_panic_on_errors_is_mounted_errors_continue(
    tmp_path: Path, fstype: str, tune2fs: list[str]
) -> None:
    """No metadata error is provoked: without errors=continue one would panic this host."""
    image = make_image(tmp_path / "panic.img", fstype, *tune2fs)
    env = attach_env(tmp_path / "run")
    with attached(image, tmp_path / "t", env, "--clones", "2"):
        [att] = json.loads(run_cli("status", "--json", env=env).stdout)
        assert len(att["mounts"]) == 2
        for mount in att["mounts"]:
            assert "errors=continue" in mount["options"].split(",")
            options = _super_options(Path(mount["path"]))
            assert "errors=continue" in options and "errors=panic" not in options
        assert (tmp_path / "t" / "p0" / "secret").read_bytes() == SECRET


# --- 2: other users ----------------------------------------------------------------------


def test_other_users_cannot_read_an_attachment_unless_shared(
    tmp_path: Path, public_dir: Path
) -> None:
    image = make_image(tmp_path / "disk.img")
    target, run = public_dir / "t", public_dir / "run"
    env = attach_env(run)
    with attached(image, target, env, "--clones", "2"):
        assert stat.S_IMODE(target.stat().st_mode) == 0o700
        refused = _as_nobody("ls", str(target))
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        assert _as_nobody("cat", str(target / "p0" / "secret")).returncode != 0
        for private in (run, run / "clones", run / "attach"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o700, private
        clone = next((run / "clones").iterdir()) / "c1" / "p0"
        assert (clone / "secret").read_bytes() == SECRET  # root reads the clone ...
        assert _as_nobody("cat", str(clone / "secret")).returncode != 0  # ... nobody else
    with attached(image, target, env, "--share", "--clones", "2"):
        assert stat.S_IMODE(target.stat().st_mode) == 0o755
        listing = _as_nobody("ls", str(target))
        assert listing.returncode == 0 and listing.stdout == "p0\n", listing
        read = _as_nobody("cat", str(target / "p0" / "secret"))
        assert read.returncode == 0 and read.stdout == SECRET.decode()
        clones = _as_nobody("ls", str(run / "clones"))
        assert clones.returncode != 0  # the clones stay private: restore runs as root
    assert not target.exists()


def test_an_existing_target_is_made_private_and_given_back_its_mode(
    tmp_path: Path, public_dir: Path
) -> None:
    image = make_image(tmp_path / "disk.img")
    target = public_dir / "t"
    target.mkdir()
    target.chmod(0o755)
    with attached(image, target, attach_env(public_dir / "run"), "--clones", "1"):
        assert stat.S_IMODE(target.stat().st_mode) == 0o700
        assert _as_nobody("ls", str(target)).returncode != 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and not any(target.iterdir())


def test_a_target_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    target = tmp_path / "theirs"
    target.mkdir()
    os.chown(target, 65534, 65534)
    result = run_cli("attach", str(image), str(target), env=attach_env(tmp_path / "run"))
    assert _one_line(result) == (
        f"{target}: owned by uid 65534, who could open it to others or swap what is mounted "
        "in it: use a directory of yours (attach makes an absent one)"
    )
    assert _loops_on(image) == [] and not is_mounted(target / "p0")


# `attach --clones 1 IMAGE TARGET` that turns TARGET/p0 into a symlink to VICTIM once its
# loop device exists and before anything is mounted: a racing user, as the mount happens.
ATTACH_WITH_SYMLINK_RACE = """\
import os, sys
from backupfs.attach.lifecycle import AttachRequest, attach
from backupfs.errors import UserError

image, target, victim = sys.argv[1:4]

def plant() -> None:
    os.symlink(victim, os.path.join(target, "p0"))

try:
    attach(AttachRequest(image=image, target=target, clones=1), after_loops=plant)
except UserError as exc:
    print(f"refused: {exc}")
    sys.exit(1)
print("attached")
"""


def test_a_symlink_at_target_pk_never_gets_the_mount(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    victim = tmp_path / "victim"
    victim.mkdir()
    env = attach_env(tmp_path / "run")
    # Planted before attach: TARGET is not empty.
    early = tmp_path / "early"
    early.mkdir()
    (early / "p0").symlink_to(victim)
    assert _one_line(run_cli("attach", str(image), str(early), env=env)) == f"{early}: not empty"
    # Planted while attach runs, after the emptiness check.
    target = tmp_path / "t"
    path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", ATTACH_WITH_SYMLINK_RACE, str(image), str(target), str(victim)],
            env={**env, "PYTHONPATH": path},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert not is_mounted(victim), "the mount followed the symlink"
        assert proc.returncode == 1, proc
        assert proc.stdout == (
            f"refused: {target}/p0: not a directory attach made (a symlink?): not mounting there\n"
        )
        assert mount_points_under(target) == [] and _loops_on(image) == []
        assert os.readlink(target / "p0") == str(victim)  # left alone, not followed
        assert not any(victim.iterdir())
    finally:
        if is_mounted(victim):
            unmount(victim)
        run_cli("detach", str(target), env=env)


def test_detach_leaves_alone_what_attach_did_not_mount(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    target, env = tmp_path / "t", attach_env(tmp_path / "run")
    with attached(image, target, env, "--clones", "1"):
        [device] = _loops_on(image)
        with tmpfs_mounted(target / "p0") as over:
            result = run_cli("detach", str(target), env=env)
            assert _one_line(result) == (
                f"{over}: tmpfs is mounted there, not {device}: not unmounting it"
            )
            assert is_mounted(over) and _loops_on(image) == [device]
    assert _loops_on(image) == [] and not target.exists()
