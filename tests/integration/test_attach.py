"""`backupfs attach/detach/status` on disks made with sfdisk and mkfs, served by nginx and
read through a real backupfs mount."""

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.attachment import ServedStore, attached, served_store
from tests.support.disks import make_disk
from tests.support.fsimages import PartSpec
from tests.support.kernel import needs_filesystems
from tests.support.mounting import run_cli, sha256_file
from tests.support.system import is_mounted, mount_points_under, remove_tree
from tests.support.trees import make_tree

# vfat is optional: where the kernel lacks it, attach must say so (tested below).
pytestmark = needs_filesystems("ext2", "ext3", "ext4", "xfs", "btrfs")

SNAP = "web03/2026-11-20T0300Z"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Disks:
    served: ServedStore
    trees: dict[str, dict[int, dict[str, str]]]  # disk -> partition -> {path: sha256}

    @property
    def store(self) -> Path:
        return self.served.root

    def image(self, disk: str) -> Path:
        return self.served.image(f"{SNAP}/{disk}")


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Disks]:
    work = tmp_path_factory.mktemp("disks")
    try:
        yield from _serve_disks(work)
    finally:
        remove_tree(work)


def _serve_disks(work: Path) -> Iterator[Disks]:
    store = work / "store"
    snap = store / SNAP
    snap.mkdir(parents=True)
    trees: dict[str, dict[int, dict[str, str]]] = {}

    def tree(name: str, seed: int, special: bool = True) -> tuple[Path, dict[str, str]]:
        root = work / "trees" / name
        return root, make_tree(root, seed, special=special)

    layouts = {
        "gpt.img": ("gpt", [("ext4", 48, True), ("xfs", 300, True), ("btrfs", 120, True)]),
        "mbr.img": ("dos", [("ext2", 24, True), ("vfat", 24, False), ("swap", 16, False)]),
        "bare.img": ("none", [("ext3", 40, True)]),
    }
    for disk, (table, parts) in layouts.items():
        specs, trees[disk] = [], {}
        for number, (fstype, size, special) in enumerate(parts, start=0 if table == "none" else 1):
            if fstype == "swap":
                specs.append(PartSpec("swap", size))
                continue
            root, sums = tree(
                f"{disk}-p{number}", seed=len(specs) + 10 * len(trees), special=special
            )
            specs.append(PartSpec(fstype, size, label=f"{fstype}data", tree=root))
            trees[disk][number] = sums
        make_disk(snap / disk, table, specs)
    with served_store(store, work) as served:
        yield Disks(served, trees)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env)


def _loops_on(image: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
    return [line.split(":")[0] for line in out.splitlines()]


def _assert_tree(root: Path, sums: dict[str, str]) -> None:
    for rel, digest in sums.items():
        assert sha256_file(root / rel) == digest, rel


def _assert_detached(image: Path, target: Path) -> None:
    assert _loops_on(image) == []
    assert mount_points_under(target) == []


def _detach_ok(env: dict[str, str], image: Path, target: Path) -> None:
    result = _cli(env, "detach", str(target))
    assert result.returncode == 0, result.stderr
    _assert_detached(image, target)


def test_gpt_disk_with_three_filesystems(
    disks: Disks, tmp_path: Path, run_env: dict[str, str]
) -> None:
    image, target = disks.image("gpt.img"), tmp_path / "restore" / "web03"
    with attached(image, target, run_env, "--clones", "2"):
        assert sorted(os.listdir(target)) == ["p1", "p2", "p3"]
        for number, sums in disks.trees["gpt.img"].items():
            _assert_tree(target / f"p{number}", sums)
        assert len(_loops_on(image)) == 6  # 3 partitions x 2 clones
        status = json.loads(_cli(run_env, "status", "--json").stdout)
        [att] = status
        assert att["complete"] and att["image"] == str(image) and att["clones"] == 2
        clone1 = [m["path"] for m in att["mounts"] if m["clone"] == 1]
        assert len(clone1) == 3 and all(is_mounted(Path(p)) for p in clone1)
        rel, digest = next(iter(disks.trees["gpt.img"][2].items()))
        assert sha256_file(Path(clone1[1]) / rel) == digest  # the xfs clone, mounted nouuid
        text = _cli(run_env, "status").stdout
        assert f"{target}  <-  {image}  (2 clones)" in text
        assert "p2  xfs [xfsdata]  2/2 mounted" in text
    _assert_detached(image, target)
    assert not target.exists()  # attach made it, detach removes it


def test_mbr_disk_skips_swap(disks: Disks, tmp_path: Path, run_env: dict[str, str]) -> None:
    image, target = disks.image("mbr.img"), tmp_path / "t"
    target.mkdir()
    with attached(image, target, run_env, "--clones", "1") as att:
        out = att.output
        assert "p3  swap  skipped: swap space, no files" in out
        _assert_tree(target / "p1", disks.trees["mbr.img"][1])
        vfat = "vfat" in Path("/proc/filesystems").read_text()
        if vfat:
            _assert_tree(target / "p2", disks.trees["mbr.img"][2])
        else:  # this kernel cannot mount FAT: skipped with a reason, not fatal
            assert (
                "p2  vfat [VFATDATA]  skipped: the running kernel has no vfat driver"
                in out.replace("vfatdata", "VFATDATA")
            )
        assert sorted(os.listdir(target)) == (["p1", "p2"] if vfat else ["p1"])
    _assert_detached(image, target)
    assert target.is_dir() and not any(target.iterdir())  # it existed before: kept, empty


def test_bare_filesystem_is_p0(disks: Disks, tmp_path: Path, run_env: dict[str, str]) -> None:
    image, target = disks.image("bare.img"), tmp_path / "t"
    with attached(image, target, run_env):
        assert os.listdir(target) == ["p0"]
        _assert_tree(target / "p0", disks.trees["bare.img"][0])
    _assert_detached(image, target)


def test_plain_local_image(disks: Disks, tmp_path: Path, run_env: dict[str, str]) -> None:
    image, target = disks.store / SNAP / "gpt.img", tmp_path / "t"
    with attached(image, target, run_env, "--partition", "1", "--clones", "1"):
        assert os.listdir(target) == ["p1"]
        _assert_tree(target / "p1", disks.trees["gpt.img"][1])
    _assert_detached(image, target)


def test_attached_filesystems_are_safe(
    disks: Disks, tmp_path: Path, run_env: dict[str, str]
) -> None:
    image, target = disks.image("gpt.img"), tmp_path / "t"
    root = target / "p1"
    with attached(image, target, run_env, "--partition", "1", "--clones", "1"):
        for attempt in (
            lambda: os.open(root / "new", os.O_WRONLY | os.O_CREAT),
            lambda: os.chmod(root / "links", 0o777),
            lambda: os.mkdir(root / "d"),
        ):
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EROFS
        assert os.stat(root / "bin/suid-id").st_mode & 0o4000  # the bit is there ...
        with pytest.raises(PermissionError):  # ... but nothing on it runs (noexec)
            subprocess.run([str(root / "bin/suid-id")], check=False)
        with pytest.raises(PermissionError):  # device nodes do not open (nodev)
            open(root / "dev/null-copy", "rb").close()
        with pytest.raises(OSError) as exc:  # absolute symlinks are not followed
            open(root / "links/abs-link", "rb").close()
        assert exc.value.errno == errno.ELOOP
        assert os.readlink(root / "links/abs-link") == "/etc/hostname"
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", str(root / "links"), str(copy)], check=True)
        assert os.readlink(copy / "abs-link") == "/etc/hostname"
    _assert_detached(image, target)


def _attach_error(env: dict[str, str], image: Path, target: Path, *extra: str) -> str:
    loops_before = _loops_on(image)
    result = _cli(env, "attach", *extra, str(image), str(target))
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert _loops_on(image) == loops_before  # a failed attach leaves nothing behind
    return result.stderr.removeprefix("backupfs: ").rstrip("\n")


def test_bad_input(disks: Disks, tmp_path: Path, run_env: dict[str, str]) -> None:
    target = tmp_path / "t"
    missing = tmp_path / "missing.img"
    assert _attach_error(run_env, missing, target) == f"{missing}: no such file"
    assert (
        _attach_error(run_env, tmp_path, target) == f"{tmp_path}: is a directory, not a disk image"
    )
    noise = tmp_path / "noise.img"
    noise.write_bytes(os.urandom(1 << 20))
    assert _attach_error(run_env, noise, target) == (
        f"{noise}: no partition table or filesystem found (not a disk image?)"
    )
    image = disks.image("gpt.img")
    assert _attach_error(run_env, image, target, "--partition", "9") == (
        f"{image} has no partition 9 (it has p1, p2, p3)"
    )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    assert _attach_error(run_env, image, busy) == f"{busy}: not empty"
    assert not target.exists()
    with attached(image, target, run_env, "--partition", "1", "--clones", "1"):
        assert _attach_error(run_env, image, target, "--partition", "1") == (
            f"{target}: already attached (run `backupfs detach {target}` first)"
        )
    _assert_detached(image, target)
    nothing = _cli(run_env, "detach", str(target))
    assert nothing.returncode == 0 and nothing.stderr == f"backupfs: nothing attached at {target}\n"


# `backupfs attach --clones 2 IMAGE TARGET` that stops for a minute once its loop devices
# exist and before it mounts anything, saying so on stdout.
ATTACH_AND_PAUSE = """\
import sys, time
from backupfs.attach.lifecycle import AttachRequest, attach

def pause() -> None:
    print("paused after loop devices", flush=True)
    time.sleep(60)

attach(AttachRequest(image=sys.argv[1], target=sys.argv[2], clones=2), after_loops=pause)
"""


def test_detach_after_attach_killed_between_loops_and_mounts(
    disks: Disks, tmp_path: Path, run_env: dict[str, str]
) -> None:
    image, target = disks.image("gpt.img"), tmp_path / "t"
    path = os.pathsep.join(filter(None, [str(REPO), run_env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", ATTACH_AND_PAUSE, str(image), str(target)],
        env={**run_env, "PYTHONPATH": path},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "paused after loop devices\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert len(_loops_on(image)) == 6
        assert "INCOMPLETE" in _cli(run_env, "status").stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _detach_ok(run_env, image, target)
    assert not target.exists()
    assert not (tmp_path / "run" / "clones").exists() or not any(
        (tmp_path / "run" / "clones").iterdir()
    )


def test_reads_under_memory_pressure(disks: Disks, tmp_path: Path, run_env: dict[str, str]) -> None:
    """Another process holds all but ~1.5 GiB of free memory while files are read through
    loop devices over the FUSE file: reads complete and are correct (no stall, no deadlock)."""
    image, target = disks.image("gpt.img"), tmp_path / "t"
    with attached(image, target, run_env, "--clones", "1"):
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3")
        _read_all_under_memory_pressure(disks, target)
    _assert_detached(image, target)


def _read_all_under_memory_pressure(disks: Disks, target: Path) -> None:
    hog = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent.parent / "support" / "memhog.py"), "1536"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hog.stdout is not None
        held = int(hog.stdout.readline())
        assert held > 0
        for number, sums in disks.trees["gpt.img"].items():
            files = [str(target / f"p{number}" / rel) for rel in sums]
            out = subprocess.run(
                ["sha256sum", *files], capture_output=True, text=True, timeout=300, check=True
            ).stdout
            got = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in out.splitlines()}
            assert got == {str(target / f"p{number}" / rel): d for rel, d in sums.items()}
    finally:
        hog.kill()
        hog.wait(timeout=30)
