"""`backupfs restore` and `backupfs flush` on real filesystems."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupfs.errors import EXIT_PARTIAL
from backupfs.store.indexer import index_store
from tests.support.attachment import attached, sectors_read, served_store
from tests.support.fsimages import flip_byte_of_file
from tests.support.mounting import BACKUPFS, run_cli, sha256_file
from tests.support.system import unmount

MiB = 1 << 20


def populate(root: Path) -> None:
    """A tree with every kind of thing restore must keep."""
    (root / "etc/app").mkdir(parents=True)
    (root / "empty/nested-empty").mkdir(parents=True)
    (root / "etc/app/conf").write_text("listen 443 ssl;\n")
    (root / "data.bin").write_bytes(os.urandom(3 * MiB + 17))
    for i in range(300):
        (root / "etc/app" / f"small-{i:03}").write_bytes(os.urandom(i * 7))
    os.link(root / "etc/app/conf", root / "conf-hardlink")
    os.link(root / "etc/app/conf", root / "empty/conf-hardlink-2")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("etc/app/conf", root / "rel-link")
    with open(root / "sparse.img", "wb") as f:
        f.truncate(64 * MiB)
        f.seek(32 * MiB)
        f.write(b"island of data")
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o4755)
    os.chown(root / "etc/app/conf", 1234, 5678)
    os.chmod(root / "etc/app/conf", 0o640)
    os.chmod(root / "empty", 0o1777)
    os.setxattr(root / "data.bin", "user.color", b"blue")
    os.setxattr(root / "data.bin", "security.label", b"secret")
    subprocess.run(["setfacl", "-m", "u:1234:rwx,g:99:r", str(root / "etc")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:r", str(root / "etc")], check=True)
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):  # contents before dirs
        ns = 1_600_000_000_123_456_789 + i * 1_000_000_007
        os.utime(path, ns=(ns - 5, ns), follow_symlinks=False)
    os.utime(root, ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_002))


def listing(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything restore promises to keep, per path (hard links as shared ids). All stats
    are taken before any content is read, since reading may update atimes."""
    paths = [root, *sorted(root.rglob("*"))]
    stats = {path: os.lstat(path) for path in paths}
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for path, st in stats.items():
        rel = str(path.relative_to(root))
        link = stat.S_ISLNK(st.st_mode)
        names = [] if link else os.listxattr(path, follow_symlinks=False)
        xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))
        kind: object = "dir"
        if stat.S_ISREG(st.st_mode):
            kind = hashlib.sha256(path.read_bytes()).hexdigest()
            if st.st_nlink > 1:
                kind = (kind, inodes.setdefault(st.st_ino, rel))
        elif link:
            kind = os.readlink(path)
        sparse = stat.S_ISREG(st.st_mode) and st.st_blocks * 512 < st.st_size
        times = (st.st_mtime_ns,) if stat.S_ISDIR(st.st_mode) else (st.st_atime_ns, st.st_mtime_ns)
        size = None if stat.S_ISDIR(st.st_mode) else st.st_size  # differs between filesystems
        out[rel] = (kind, st.st_mode, st.st_uid, st.st_gid, size, times, xattrs, sparse)
    return out


@pytest.fixture
def attached_tree(
    tmp_path: Path, run_env: dict[str, str]
) -> Iterator[tuple[Path, dict[str, tuple[object, ...]]]]:
    """An ext4 image populated read-write, then attached read-only with two clones."""
    image, rw = tmp_path / "disk.img", tmp_path / "rw"
    rw.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-I", "256", str(image), "128M"], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(rw)], check=True)
    try:
        populate(rw)
    finally:
        unmount(rw)
    with attached(image, tmp_path / "attached", run_env, "--clones", "2") as att:
        yield att.target / "p0", listing(att.target / "p0")


def _restore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("restore", *args, env=env or {**os.environ})


def test_metadata_round_trip(
    attached_tree: tuple[Path, dict], tmp_path: Path, run_env: dict[str, str]
) -> None:
    source, before = attached_tree
    dest = tmp_path / "restored"
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")  # so the copy reads the loop devices
    sectors_before = sectors_read(run_env)
    result = _restore(str(source), str(dest), env=run_env)
    assert result.returncode == 0, result.stderr
    sectors_after = sectors_read(run_env)
    assert len(sectors_after) == 2
    assert all(sectors_after[d] > sectors_before[d] for d in sectors_after), "a clone sat idle"
    assert result.stdout.splitlines()[-1].startswith(f"flushed {tmp_path}")
    assert "syncfs in" in result.stdout
    after = listing(dest)
    assert after.keys() == before.keys()
    for rel in before:
        assert after[rel] == before[rel], rel
    assert not list(dest.rglob(".backupfs-*"))


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}  # fmt: skip


def test_interrupted_restore_resumes(tmp_path: Path) -> None:
    source, dest = tmp_path / "src", tmp_path / "dest"
    source.mkdir()
    for d in range(20):
        (source / f"d{d:02}").mkdir()
        for i in range(150):
            (source / f"d{d:02}" / f"f{i:03}").write_bytes(os.urandom(1000 + i * 50))
    (source / "big").write_bytes(os.urandom(64 * MiB))
    proc = subprocess.Popen([*BACKUPFS, "restore", "--jobs", "1", str(source), str(dest)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(dest.rglob("f*"))) < 200:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    copied = len(list(dest.rglob("f*")))
    assert 0 < copied < 3000, "the kill did not land in the middle of the restore"
    result = _restore(str(source), str(dest))  # no flag needed: the marker says "resume"
    assert result.returncode == 0, result.stderr
    assert "already there" in result.stdout
    assert _tree_digest(dest) == _tree_digest(source)
    assert not list(dest.rglob(".backupfs-*"))


def test_a_destination_that_is_a_file_is_refused(tmp_path: Path) -> None:
    source, dest = tmp_path / "src", tmp_path / "dest"
    source.mkdir()
    (source / "a").write_text("new")
    dest.write_text("a file")
    result = _restore(str(source), str(dest))
    assert result.returncode == 1
    assert result.stderr == f"backupfs: {dest}: exists and is not a directory\n"
    assert dest.read_text() == "a file"


def test_non_empty_destination_is_refused(tmp_path: Path) -> None:
    source, dest = tmp_path / "src", tmp_path / "dest"
    source.mkdir()
    (source / "a").write_text("new")
    dest.mkdir()
    (dest / "a").write_text("old")
    result = _restore(str(source), str(dest))
    assert result.returncode == 1
    assert result.stderr == (
        f"backupfs: {dest}: not empty (use --skip-existing or --overwrite to restore into it)\n"
    )
    assert _restore("--skip-existing", str(source), str(dest)).returncode == 0
    assert (dest / "a").read_text() == "old"
    assert _restore("--overwrite", str(source), str(dest)).returncode == 0
    assert (dest / "a").read_text() == "new"


def test_several_sources_land_in_dest_by_name(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "a/deep").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a/deep/one").write_bytes(os.urandom(5000))
    (src / "b/two").write_bytes(os.urandom(3 * MiB))
    (src / "b/dir").mkdir()
    (src / "b/dir/three").write_text("3")
    os.symlink("one", src / "a/deep/link")
    sources = [src / "a/deep/one", src / "b/two", src / "b/dir", src / "a/deep/link"]
    result = _restore("--json", *map(str, sources), str(dest))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(dest)) == ["dir", "link", "one", "two"]
    for name, original in (("one", src / "a/deep/one"), ("two", src / "b/two")):
        assert sha256_file(dest / name) == sha256_file(original)
    assert (dest / "dir/three").read_text() == "3" and os.readlink(dest / "link") == "one"
    assert json.loads(result.stdout)["files"] == 3


def test_files_from_keeps_relative_paths(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for rel in ("usr/share/doc/a/copyright", "usr/share/doc/b/copyright", "etc/x/y/z", "etc/q"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(os.urandom(len(rel) * 1000))
    os.chmod(src / "usr/share/doc/a", 0o751)
    listing_file = tmp_path / "list"
    listing_file.write_text(
        "usr/share/doc/a/copyright\n/usr/share/doc/b/copyright\netc/x\netc/x/y/z\n\n"
    )
    result = _restore("--json", "--files-from", str(listing_file), str(src), str(dest))
    assert result.returncode == 0, result.stderr
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["etc/x/y/z", "usr/share/doc/a/copyright", "usr/share/doc/b/copyright"]
    for rel in got:
        assert sha256_file(dest / rel) == sha256_file(src / rel)
    assert stat.S_IMODE(os.stat(dest / "usr/share/doc/a").st_mode) == 0o751
    assert json.loads(result.stdout)["files"] == 3

    listing_file.write_text("../outside\n")
    escape = _restore("--files-from", str(listing_file), str(src), str(tmp_path / "d2"))
    assert escape.returncode == 1
    assert escape.stderr == (f"backupfs: --files-from: '../outside' is not a path inside {src}\n")


def test_two_sources_with_one_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x/f").write_text("x")
    (tmp_path / "y/f").write_text("y")
    dest = tmp_path / "dest"
    result = _restore(str(tmp_path / "x/f"), str(tmp_path / "y/f"), str(dest))
    assert result.returncode == 1
    assert result.stderr == (
        f"backupfs: two sources are named f: both would be restored to {dest}/f\n"
    )
    assert not dest.exists()


def test_full_disk_reports_failures_and_leaves_no_partial_files(tmp_path: Path) -> None:
    source, small = tmp_path / "src", tmp_path / "small"
    source.mkdir()
    small.mkdir()
    sums = {}
    for i in range(12):
        data = os.urandom(MiB)
        (source / f"f{i:02}").write_bytes(data)
        sums[f"f{i:02}"] = hashlib.sha256(data).hexdigest()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        result = _restore("--jobs", "1", "--json", str(source), str(small / "dest"))
        assert result.returncode == EXIT_PARTIAL
        failed = [
            line for line in result.stderr.splitlines() if line.startswith("backupfs: failed:")
        ]
        assert failed and all("No space left on device" in line for line in failed)
        assert result.stderr.splitlines()[-1].endswith("files failed, the rest was restored")
        restored = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in (small / "dest").iterdir() if not p.name.startswith(".")}  # fmt: skip
        assert restored and all(sums[name] == digest for name, digest in restored.items())
        assert len(restored) + len(failed) == 12
        summary = json.loads(result.stdout)
        assert summary["ok"] is False and summary["files"] == len(restored)
        assert sorted(f["path"] for f in summary["failed"]) == sorted(
            line.split(": ")[2] for line in failed
        )
        assert not [p for p in (small / "dest").iterdir() if p.name.startswith(".backupfs-tmp")]
    finally:
        unmount(small)


def test_flush_says_how(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    result = run_cli("flush", str(tmp_path), str(tmp_path / "x"))
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith(f"{tmp_path} (") and ": syncfs in " in line
    missing = run_cli("flush", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert missing.stderr == f"backupfs: {tmp_path / 'nope'}: no such file or directory\n"


def test_a_bad_block_in_the_backup_fails_one_file_only(
    tmp_path: Path, run_env: dict[str, str]
) -> None:
    """One corrupted byte in the store: its block fails verification (EIO) through the
    mount, the loop device and ext4; restore reports that file and restores the rest."""
    tree, store = tmp_path / "tree", tmp_path / "store"
    tree.mkdir()
    sums = {}
    for name in ("a.bin", "bad.bin", "c.bin"):
        data = os.urandom(4 * MiB)
        (tree / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    image = store / "h" / "2026-01-01" / "disk.img"
    image.parent.mkdir(parents=True)
    subprocess.run(["mkfs.ext4", "-q", "-b", "4096", "-d", str(tree), str(image), "64M"],
                   check=True)  # fmt: skip
    index_store(store, say=lambda _: None)
    flip_byte_of_file(image, "/bad.bin", 512)  # 2 MiB into bad.bin: no other file near it
    target, dest = tmp_path / "attached", tmp_path / "restored"
    with (
        served_store(store, tmp_path, index=False) as served,  # indexed before the damage
        attached(served.image("h/2026-01-01/disk.img"), target, run_env) as att,
    ):
        result = _restore(str(target / "p0"), str(dest), env=att.env)
    assert result.returncode == EXIT_PARTIAL
    assert result.stderr.splitlines() == [
        "backupfs: failed: bad.bin: Input/output error",
        "backupfs: 1 file failed, the rest was restored",
    ]
    restored = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dest.iterdir()
                if p.name != "lost+found" and not p.name.startswith(".backupfs")}  # fmt: skip
    assert restored == {"a.bin": sums["a.bin"], "c.bin": sums["c.bin"]}
    assert not list(dest.glob(".backupfs-tmp*"))
