"""`backupfs find/log/diff/cat` over HTTP, as nobody, on ext4 and xfs snapshots made here.

Each filesystem gets three snapshots of a tree changed between them (files added,
removed, modified in place, renamed, a mode changed, a type changed); the expected diff
is computed from the source trees with os.lstat and the bytes, independently of backupfs.
"""

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupfs.store.indexer import index_store
from tests.support.disks import make_disk
from tests.support.fsimages import PartSpec
from tests.support.kernel import missing_filesystems
from tests.support.mounting import BACKUPFS as BACKUPFS_ROOT
from tests.support.nginx import Nginx
from tests.support.nobody import nobody_backupfs

SNAPS = ("2026-11-20T0300Z", "2026-11-21T0300Z", "2026-11-22T0300Z")
T0 = 1_795_000_000


def _write(root: Path, rel: str, data: bytes, mtime: int, mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))


def make_trees(work: Path) -> list[Path]:
    """Three versions of one tree, each changed from the one before."""
    rng = __import__("random").Random(7)
    s1 = work / "s1"
    _write(s1, "etc/nginx/nginx.conf", b"worker_processes 1;\n", T0)
    _write(s1, "etc/hosts", b"127.0.0.1 localhost\n", T0)
    _write(s1, "etc/motd", b"welcome\n", T0)
    _write(s1, "var/lib/data.bin", rng.randbytes(300 << 10), T0)
    _write(s1, "home/alice/notes.txt", b"remember the milk\n", T0)
    _write(s1, "opt/app/run.sh", b"#!/bin/sh\necho hi\n", T0, 0o755)
    _write(s1, "srv/big.bin", rng.randbytes(3 << 20), T0)
    for i in range(40):
        _write(s1, f"usr/share/doc/pkg{i:02d}/README", f"package {i}\n".encode(), T0)
    os.symlink("/usr/share/zoneinfo/UTC", s1 / "etc/localtime")
    s2 = work / "s2"
    shutil.copytree(s1, s2, symlinks=True)
    _write(s2, "etc/nginx/conf.d/site.conf", b"server { listen 80; }\n", T0 + 100)
    (s2 / "etc/motd").unlink()
    data = bytearray((s2 / "var/lib/data.bin").read_bytes())
    data[150 << 10 : (150 << 10) + 16] = b"X" * 16  # in place: same size
    _write(s2, "var/lib/data.bin", bytes(data), T0 + 100)
    (s2 / "home/alice/notes.txt").rename(s2 / "home/alice/notes-old.txt")
    (s2 / "opt/app/run.sh").chmod(0o700)  # mode only
    _write(s2, "etc/nginx/nginx.conf", b"worker_processes 4;\nevents {}\n", T0 + 100)
    s3 = work / "s3"
    shutil.copytree(s2, s3, symlinks=True)
    _write(s3, "etc/nginx/nginx.conf", b"worker_processes 8;\nevents {}\n", T0 + 200)
    big = bytearray((s3 / "srv/big.bin").read_bytes())
    big[1 << 20 : (1 << 20) + 4096] = rng.randbytes(4096)
    _write(s3, "srv/big.bin", bytes(big), T0 + 200)
    (s3 / "etc/localtime").unlink()
    _write(s3, "etc/localtime", b"TZif2 not really\n", T0 + 200)  # symlink -> file
    shutil.rmtree(s3 / "usr/share/doc/pkg07")
    return [s1, s2, s3]


def expected_diff(a: Path, b: Path) -> set[tuple[str, str]]:
    def tree(root: Path) -> dict[str, os.stat_result]:
        out = {}
        for top, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(top) / name
                out["/" + str(path.relative_to(root))] = path.lstat()
        return out

    ta, tb = tree(a), tree(b)
    found = set()
    for path in ta.keys() | tb.keys():
        sa, sb = ta.get(path), tb.get(path)
        if sa is None:
            found.add(("+", path))
        elif sb is None:
            found.add(("-", path))
        elif (sa.st_mode >> 12) != (sb.st_mode >> 12):
            found.add(("T", path))
        elif not os.path.isdir(a / path[1:]) and _content(a, path) != _content(b, path):
            found.add(("M", path))
        elif (sa.st_mode, sa.st_uid, sa.st_gid) != (sb.st_mode, sb.st_uid, sb.st_gid) or (
            not os.path.isdir(a / path[1:]) and sa.st_mtime_ns != sb.st_mtime_ns
        ):
            found.add(("U", path))
    return found


def _content(root: Path, path: str) -> bytes:
    full = root / path[1:]
    return os.readlink(full).encode() if full.is_symlink() else full.read_bytes()


@dataclass(frozen=True)
class History:
    url: str
    fstype: str
    trees: list[Path]
    partition: str  # where the filesystem is on the disk: "p0" or "p1"


LAYOUTS = {"ext4": "none", "xfs": "gpt"}


@pytest.fixture(scope="module", params=["ext4", "xfs"])
def history(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    fstype = str(request.param)
    if os.geteuid() != 0:
        pytest.skip("making the images and running as nobody need root")
    if missing_filesystems(fstype):  # the images are made through the kernel's driver
        pytest.skip(f"the running kernel has no {fstype} driver")
    if fstype == "xfs":
        pytest.importorskip("backupfs.plan.xfsmeta", reason="no userspace xfs reader")
    work = tmp_path_factory.mktemp(f"history-{fstype}")
    trees = make_trees(work / "trees")
    store = work / "store"
    for snap, tree in zip(SNAPS, trees, strict=True):
        disk = store / "web01" / snap / "disk0.img"
        disk.parent.mkdir(parents=True)
        size_mib = 300 if fstype == "xfs" else 64  # mkfs.xfs wants 300 MiB
        make_disk(disk, LAYOUTS[fstype], [PartSpec(fstype, size_mib, tree=tree)])
    index_store(store, say=lambda _: None)
    os.chmod(work, 0o755)
    with Nginx(store, work / "nginx") as nginx:
        yield History(nginx.url, fstype, trees, "p0" if LAYOUTS[fstype] == "none" else "p1")


def run(history: History, *args: str) -> subprocess.CompletedProcess[bytes]:
    with nobody_backupfs() as backupfs:
        return subprocess.run([*backupfs, *args], capture_output=True, timeout=300, cwd="/")


def test_diff_equals_the_diff_of_the_source_trees(history: History) -> None:
    for i in (0, 1):
        result = run(history, "diff", "--json", history.url,
                     f"web01/{SNAPS[i]}", f"web01/{SNAPS[i + 1]}")  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        got = {(r["change"], r["path"]) for r in json.loads(result.stdout)}
        got = {(c, p) for c, p in got if not p.startswith("/lost+found")}
        assert got == expected_diff(history.trees[i], history.trees[i + 1])


def test_diff_below_a_path(history: History) -> None:
    result = run(history, "diff", "--path", "/etc", history.url, f"web01/{SNAPS[0]}",
                 f"web01/{SNAPS[1]}")  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    lines = set(result.stdout.decode().splitlines())
    assert "-    /etc/motd" in lines and "+    /etc/nginx/conf.d/site.conf" in lines
    assert all(" /etc" in line for line in lines)


def test_log_finds_the_distinct_versions(history: History) -> None:
    result = run(history, "log", "--json", "--hash", history.url, "web01", "/etc/nginx/nginx.conf")
    assert result.returncode == 0, result.stderr.decode()
    versions = json.loads(result.stdout)
    want = [hashlib.sha256((t / "etc/nginx/nginx.conf").read_bytes()).hexdigest()
            for t in history.trees]  # fmt: skip
    assert [v["sha256"] for v in versions] == want
    assert [(v["first"], v["last"]) for v in versions] == [(f"web01/{s}",) * 2 for s in SNAPS]
    hosts = run(history, "log", "--json", history.url, "web01", "/etc/hosts")
    [one] = json.loads(hosts.stdout)
    assert (one["first"], one["last"]) == (f"web01/{SNAPS[0]}", f"web01/{SNAPS[2]}")
    motd = json.loads(run(history, "log", "--json", history.url, "web01", "/etc/motd").stdout)
    assert [(v["first"], v["last"]) for v in motd] == [(f"web01/{SNAPS[0]}",) * 2]


def test_find_with_a_glob(history: History) -> None:
    result = run(history, "find", "--json", history.url, "web01", "/etc/nginx/**/*.conf")
    assert result.returncode == 0, result.stderr.decode()
    got = {(r["snapshot"].split("/")[1], r["path"]) for r in json.loads(result.stdout)}
    assert got == {
        (SNAPS[0], "/etc/nginx/nginx.conf"),
        (SNAPS[1], "/etc/nginx/nginx.conf"), (SNAPS[1], "/etc/nginx/conf.d/site.conf"),
        (SNAPS[2], "/etc/nginx/nginx.conf"), (SNAPS[2], "/etc/nginx/conf.d/site.conf"),
    }  # fmt: skip
    named = run(history, "find", "--json", "--hash", history.url, f"web01/{SNAPS[0]}", "README")
    rows = json.loads(named.stdout)
    assert len(rows) == 40
    readme = history.trees[0] / "usr/share/doc/pkg03/README"
    [row] = [r for r in rows if r["path"] == "/usr/share/doc/pkg03/README"]
    assert row["sha256"] == hashlib.sha256(readme.read_bytes()).hexdigest()
    assert row["size"] == readme.stat().st_size and row["mode"] == "0644"


def test_cat_gives_the_bytes(history: History) -> None:
    for snap, tree in zip(SNAPS, history.trees, strict=True):
        for rel in ("srv/big.bin", "var/lib/data.bin", "etc/nginx/nginx.conf"):
            spec = f"web01/{snap}/disk0.img:{history.partition}:/{rel}"
            result = run(history, "cat", history.url, spec)
            assert result.returncode == 0, result.stderr.decode()
            assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(
                (tree / rel).read_bytes()
            ).hexdigest()
    missing = run(history, "cat", history.url, f"web01/{SNAPS[0]}/disk0.img:/nope")
    assert missing.returncode == 1
    assert missing.stderr.decode().count("\n") == 1 and "no such file" in missing.stderr.decode()


def test_a_damaged_snapshot_is_one_line_and_the_others_are_reported(tmp_path: Path) -> None:
    """Six snapshots (more than are read at once), the fourth one's root directory damaged."""
    from backupfs.plan.ext4meta import Ext4

    trees = make_trees(tmp_path / "trees")
    store = tmp_path / "store"
    names = [f"2026-11-{day:02d}T0300Z" for day in range(20, 26)]
    for snap in names:
        disk = store / "web01" / snap / "disk0.img"
        disk.parent.mkdir(parents=True)
        make_disk(disk, "none", [PartSpec("ext4", 64, tree=trees[0])])
    damaged = store / "web01" / names[3] / "disk0.img"
    with open(damaged, "r+b") as f:
        fs = Ext4(lambda off, n: os.pread(f.fileno(), n, off), 0)
        start, _ = fs.inode_range(2)  # the root directory: its extent tree's header
        os.pwrite(f.fileno(), b"\xff" * 12, start + 40)
    index_store(store, say=lambda _: None)
    os.chmod(tmp_path, 0o755)
    with Nginx(store, tmp_path / "nginx") as nginx:
        result = subprocess.run([*BACKUPFS_ROOT, "find", "--json", nginx.url, "web01", "README"],
                                capture_output=True, timeout=300)  # fmt: skip
    assert result.returncode == 23, result.stderr.decode()
    rows = json.loads(result.stdout)
    good = {f"web01/{n}" for n in names} - {f"web01/{names[3]}"}
    assert len(rows) == 40 * 5 and {r["snapshot"] for r in rows} == good
    [line] = result.stderr.decode().splitlines()
    assert line.startswith(f"backupfs: web01/{names[3]}/disk0.img:p0: ")
    assert "extent" in line
