"""`backupfs restore` as root never writes outside DEST, whatever DEST holds or becomes
while it runs; --skip-existing leaves existing directories alone; what carries privilege
(setuid/setgid, file capabilities, device nodes) is counted, and --no-special leaves it
out; a directory or inode the walk cannot read is reported and the rest restored.

Outside DEST, a directory `outside/` stands for the host's files (/etc, /root/.ssh): every
test checks, by listing and lstat, that nothing in it was created, changed or removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backupfs.cli.parser import build_parser
from backupfs.errors import EXIT_OK, EXIT_PARTIAL
from backupfs.restore.durability import Target
from backupfs.restore.pipeline import Pipeline
from tests.support.kernel import needs_filesystems
from tests.support.mounting import BACKUPFS, run_cli
from tests.support.system import unmount

MiB = 1 << 20
MARKER = ".backupfs-restore-in-progress"
NOT_FOLLOWED = "a symlink in DEST, not followed"
# struct vfs_cap_data, revision 2: effective, CAP_NET_RAW (13) permitted
CAP_NET_RAW = struct.pack("<5I", 0x02000000 | 1, 1 << 13, 0, 0, 0)


def _tmp_name(name: str) -> str:
    """The temporary name restore writes `name` under (copying.tmp_name)."""
    return ".backupfs-tmp." + hashlib.sha256(os.fsencode(name)).hexdigest()[:20]


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a tree that a write, chown, chmod, utime or link changes."""
    out: dict[str, tuple[object, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(path)
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        out[str(path.relative_to(root))] = (
            st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_ino,
            st.st_mtime_ns, content,
        )  # fmt: skip
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """The host's files, as far as these tests go; unchanged at the end of every test."""
    root = tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    (root / "victim").write_text("the host's file\n")
    (root / _tmp_name("a")).write_text("looks like a stale temporary file\n")
    os.chmod(root, 0o755)
    os.utime(root / "victim", ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "restore wrote outside DEST"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """sub/ with small files, a large one (streamed by a reader), a deeper directory, a
    symlink and a fifo; owners and modes that a chown or chmod outside would show."""
    src = tmp_path / "src"
    (src / "sub/deeper").mkdir(parents=True)
    (src / "keep").mkdir()
    (src / "top").write_text("top\n")
    (src / "sub/a").write_text("a\n")
    (src / "sub/b").write_text("b\n")
    (src / "sub/big").write_bytes(os.urandom(3 * MiB))
    (src / "sub/deeper/c").write_text("c\n")
    (src / "sub/link").symlink_to("/etc/passwd")
    os.mkfifo(src / "sub/fifo")
    (src / "keep/f").write_text("f\n")
    (src / "keep/g").write_text("g\n")
    for path in [src, *src.rglob("*")]:
        os.chown(path, 4321, 4321, follow_symlinks=False)
    os.chmod(src / "sub", 0o4777)
    return src


def _restore(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("restore", *args, env={**os.environ})


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`backupfs restore ARGS` in this process (so a test can step in between phases)."""
    parsed = build_parser().parse_args(["restore", *args])
    rc = parsed.func(parsed)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _failed_lines(*paths_and_reasons: tuple[str, str]) -> list[str]:
    lines = [f"backupfs: failed: {p}: {why}" for p, why in sorted(paths_and_reasons)]
    count = len(lines)
    noun = "file" if count == 1 else "files"
    return [*lines, f"backupfs: {count} {noun} failed, the rest was restored"]


# --- symlinks already in DEST ------------------------------------------------------------


@pytest.mark.parametrize("how", ["--overwrite", "--skip-existing", "resume"])
@pytest.mark.parametrize("where", ["sub", "sub/deeper"])
def test_a_symlink_in_dest_is_not_followed(
    tmp_path: Path, source: Path, outside: Path, how: str, where: str
) -> None:
    """A symlink where a directory of the backup goes, left by an earlier restore or put
    there by someone: reported, not followed; everything else is restored."""
    dest = tmp_path / "dest"
    (dest / where).parent.mkdir(parents=True, exist_ok=True)
    (dest / where).symlink_to(outside)
    if how == "resume":
        (dest / MARKER).write_text("{}")
    result = _restore(*([] if how == "resume" else [how]), str(source), str(dest))
    assert result.returncode == EXIT_PARTIAL, result
    assert result.stderr.splitlines() == _failed_lines((where, NOT_FOLLOWED))
    assert os.readlink(dest / where) == str(outside)
    assert (dest / "top").read_text() == "top\n" and (dest / "keep/f").read_text() == "f\n"
    if where == "sub/deeper":
        assert (dest / "sub/a").read_text() == "a\n"
        assert (dest / "sub/big").read_bytes() == (source / "sub/big").read_bytes()
    assert (dest / MARKER).exists()  # not complete: a re-run resumes


def test_a_dangling_marker_symlink_is_replaced_not_followed(
    tmp_path: Path, source: Path, outside: Path
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / MARKER).symlink_to(outside / "created-by-the-marker")
    result = _restore("--overwrite", str(source), str(dest))
    assert result.returncode == EXIT_OK, result.stderr
    assert not os.path.lexists(dest / MARKER)
    assert not os.path.lexists(outside / "created-by-the-marker")
    assert (dest / "sub/deeper/c").read_text() == "c\n"


def test_a_hard_link_to_a_symlink_in_dest_is_not_followed(tmp_path: Path, outside: Path) -> None:
    """The walk meets z-first first (names are popped last first), so a-second is
    restored as a hard link to it; with --skip-existing, DEST's z-first is left alone, and
    it is a symlink to a host file."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "z-first").write_text("linked\n")
    os.link(src / "z-first", src / "a-second")
    dest.mkdir()
    (dest / "z-first").symlink_to(outside / "victim")
    result = _restore("--skip-existing", str(src), str(dest))
    assert result.returncode == EXIT_PARTIAL, result
    assert result.stderr.splitlines() == _failed_lines(
        ("a-second", "z-first is not a regular file in DEST, not linked to")
    )
    assert not os.path.lexists(dest / "a-second")
    assert os.lstat(outside / "victim").st_nlink == 1


# --- DEST changing while the restore runs --------------------------------------------------


def _between_dirs_and_files(
    monkeypatch: pytest.MonkeyPatch, step: Callable[[Path], None], dest: Path
) -> None:
    """Run `step` after restore made the directories and before it writes a file."""
    copy_files = Pipeline.copy_files

    def stepped(self: Pipeline) -> None:
        step(dest)
        copy_files(self)

    monkeypatch.setattr(Pipeline, "copy_files", stepped)


@pytest.mark.parametrize("resolve", ["openat2", "fallback"])
def test_a_directory_swapped_for_a_symlink_mid_restore(
    tmp_path: Path,
    source: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    resolve: str,
) -> None:
    """A local user replaces a directory restore has made with a symlink to the host's
    files, after the directory pass and before its files are written."""
    if resolve == "fallback":
        monkeypatch.setattr("backupfs.linux.openat2.supported", lambda fd: False)
    dest = tmp_path / "dest"

    def swap(dest: Path) -> None:
        (dest / "sub").rename(tmp_path / "moved-away")
        (dest / "sub").symlink_to(outside)

    _between_dirs_and_files(monkeypatch, swap, dest)
    rc, out, err = _cli(capsys, str(source), str(dest))
    assert rc == EXIT_PARTIAL, err
    assert err.splitlines() == _failed_lines(("sub", NOT_FOLLOWED))
    assert out.startswith("restored 3 files (")
    assert os.readlink(dest / "sub") == str(outside)
    assert (dest / "keep/g").read_text() == "g\n"
    assert [str(p.relative_to(tmp_path)) for p in (tmp_path / "moved-away").rglob("*")] == [
        "moved-away/deeper"
    ]  # no descriptor of it was kept: nothing was written where it went either


def test_names_planted_where_temporary_files_go_are_not_opened(
    tmp_path: Path,
    source: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A hard link to a host file, and a symlink, put under the temporary names restore
    is about to create: replaced by files of restore's own, the host file untouched."""
    dest = tmp_path / "dest"

    def plant(dest: Path) -> None:
        os.link(outside / "victim", dest / "keep" / _tmp_name("f"))
        (dest / "keep" / _tmp_name("g")).symlink_to(outside / "victim")

    _between_dirs_and_files(monkeypatch, plant, dest)
    rc, _, err = _cli(capsys, str(source), str(dest))
    assert rc == EXIT_OK, err
    assert (dest / "keep/f").read_text() == "f\n" and (dest / "keep/g").read_text() == "g\n"
    assert os.stat(dest / "keep/f").st_ino != os.stat(outside / "victim").st_ino
    assert stat.S_IMODE(os.stat(dest / "sub").st_mode) == 0o4777
    assert not list(dest.rglob(".backupfs-tmp.*"))


def test_where_syncfs_will_not_do_files_are_fsynced_beneath_dest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On NFS, CIFS or FUSE each restored file and directory is fsynced instead, opened
    beneath DEST without following symlinks: symlinks (and fifos) are not among them."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub/one").write_text("1")
    (src / "two").write_text("2")
    (src / "link").symlink_to("two")
    monkeypatch.setattr(Target, "uses_syncfs", property(lambda self: False))
    rc, out, err = _cli(capsys, str(src), str(tmp_path / "dest"))
    assert rc == EXIT_OK, err
    assert out.splitlines()[-1].startswith(f"flushed {tmp_path} (")
    assert ": fsync of 4 files and directories in " in out.splitlines()[-1]


# --- --skip-existing ---------------------------------------------------------------------


def test_skip_existing_leaves_existing_directories_alone(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "d").mkdir(parents=True)
    (src / "new").mkdir()
    (src / "d/a").write_text("from the backup\n")
    (src / "new/n").write_text("n\n")
    os.chmod(src / "d", 0o700)
    os.chmod(src / "new", 0o751)
    os.chmod(src, 0o700)
    (dest / "d").mkdir(parents=True)
    (dest / "d/a").write_text("mine\n")
    for path in (dest, dest / "d"):
        os.chown(path, 1000, 1000)
        os.chmod(path, 0o755)
    os.utime(dest / "d", ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_000))
    before = os.lstat(dest / "d")
    result = _restore("--skip-existing", str(src), str(dest))
    assert result.returncode == EXIT_OK, result.stderr
    after = os.lstat(dest / "d")
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_mode, 1000, 1000, 1_400_000_000_000_000_000, before.st_ctime_ns,
    )  # fmt: skip
    top = os.lstat(dest)
    assert (stat.S_IMODE(top.st_mode), top.st_uid, top.st_gid) == (0o755, 1000, 1000)
    assert (dest / "d/a").read_text() == "mine\n"
    assert (dest / "new/n").read_text() == "n\n"
    assert stat.S_IMODE(os.lstat(dest / "new").st_mode) == 0o751  # new ones get theirs


# --- what carries privilege --------------------------------------------------------------


@pytest.fixture
def privileged(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "dev").mkdir()
    shutil.copyfile("/usr/bin/id", src / "bin/suid")
    shutil.copyfile("/usr/bin/id", src / "bin/sgid")
    shutil.copyfile("/usr/bin/id", src / "bin/ping")
    (src / "plain").write_text("plain\n")
    os.chmod(src / "bin/suid", 0o4755)
    os.chmod(src / "bin/sgid", 0o2755)
    os.chmod(src / "bin/ping", 0o755)
    os.setxattr(src / "bin/ping", "security.capability", CAP_NET_RAW)
    os.mknod(src / "dev/null-copy", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(src / "dev/null-copy", 0o666)
    os.chmod(src / "dev", 0o2775)  # setgid on a directory: no privilege, kept
    return src


def test_root_restores_privilege_and_says_so(tmp_path: Path, privileged: Path) -> None:
    dest = tmp_path / "dest"
    result = _restore(str(privileged), str(dest))
    assert result.returncode == EXIT_OK, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"restored 4 files \(.*\) in .*s", lines[0])
    assert lines[1] == (
        "special: restored 2 setuid/setgid files, 1 file with capabilities, 1 device node "
        "(--no-special leaves them out)"
    )
    assert lines[2].startswith("flushed ")
    assert stat.S_IMODE(os.lstat(dest / "bin/suid").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(dest / "bin/sgid").st_mode) == 0o2755
    assert os.getxattr(dest / "bin/ping", "security.capability") == CAP_NET_RAW
    node = os.lstat(dest / "dev/null-copy")
    assert stat.S_ISCHR(node.st_mode) and node.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(node.st_mode) == 0o666
    summary = json.loads(_restore("--json", str(privileged), str(tmp_path / "d2")).stdout)
    assert summary["special"] == {"setuid_setgid": 2, "capabilities": 1, "device_nodes": 1}
    assert summary["no_special"] is False
    assert summary["left_out"] == {"setuid_setgid": 0, "capabilities": 0, "device_nodes": 0}
    assert summary["skipped_device_nodes"] == []


def test_no_special_leaves_privilege_out(tmp_path: Path, privileged: Path) -> None:
    dest = tmp_path / "dest"
    result = _restore("--no-special", str(privileged), str(dest))
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[1:3] == [
        "special: left out (--no-special): 2 setuid/setgid files, 1 file with capabilities, "
        "1 device node",
        "skipped device node: dev/null-copy",
    ]
    assert stat.S_IMODE(os.lstat(dest / "bin/suid").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(dest / "bin/sgid").st_mode) == 0o755
    assert "security.capability" not in os.listxattr(dest / "bin/ping")
    assert (dest / "bin/ping").read_bytes() == (privileged / "bin/ping").read_bytes()
    assert sorted(os.listdir(dest / "dev")) == []
    assert stat.S_IMODE(os.lstat(dest / "dev").st_mode) == 0o2775
    summary = json.loads(
        _restore("--no-special", "--json", str(privileged), str(tmp_path / "d2")).stdout
    )
    assert summary["special"] == {"setuid_setgid": 0, "capabilities": 0, "device_nodes": 0}
    assert summary["no_special"] is True
    assert summary["left_out"] == {"setuid_setgid": 2, "capabilities": 1, "device_nodes": 1}
    assert summary["skipped_device_nodes"] == ["dev/null-copy"]
    assert summary["ok"] is True


# --- what the walk cannot read -----------------------------------------------------------


def test_unreadable_directories_fail_alone(tmp_path: Path) -> None:
    """Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (as on NFS with root_squash, or a
    FUSE mount without allow_other): a directory it may not list, one whose entries it may
    not look up; both reported, the rest restored."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    for rel in ("locked", "nolookup", "ok"):
        (src / rel).mkdir(parents=True, exist_ok=True)
    for rel in ("a", "locked/l", "nolookup/x", "ok/y"):
        (src / rel).write_text(rel)
    for path in [src, *src.rglob("*")]:
        os.chown(path, 65534, 65534)
    os.chmod(src / "locked", 0o000)
    os.chmod(src / "nolookup", 0o644)  # listable, but no entry can be looked up
    cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *BACKUPFS]
    result = subprocess.run(
        [*cmd, "restore", str(src), str(dest)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == EXIT_PARTIAL, result
    assert result.stderr.splitlines() == _failed_lines(
        ("locked", "Permission denied"), ("nolookup/x", "Permission denied")
    )
    assert (dest / "a").read_text() == "a" and (dest / "ok/y").read_text() == "ok/y"
    assert sorted(os.listdir(dest / "locked")) == [] == sorted(os.listdir(dest / "nolookup"))
    assert stat.S_IMODE(os.lstat(dest / "locked").st_mode) == 0o000


@needs_filesystems("ext4")
def test_a_bad_directory_block_and_a_bad_inode_fail_alone(tmp_path: Path) -> None:
    """ext4 with metadata checksums: one directory block and one inode damaged in the
    image; the kernel says EBADMSG for those two, restore restores everything else."""
    tree, image, mnt = tmp_path / "tree", tmp_path / "fs.img", tmp_path / "mnt"
    for rel in ("bad/f1", "bad/f2", "good/g1", "good/g2", "good/g3", "top"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(rel)
    subprocess.run(["mkfs.ext4", "-q", "-b", "4096", "-O", "metadata_csum", "-d", str(tree),
                    str(image), "16M"], check=True, timeout=60)  # fmt: skip
    block = int(_debugfs(image, "blocks /bad").split()[0])
    where = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)",
                      _debugfs(image, "imap /good/g2"))  # fmt: skip
    assert where is not None
    with open(image, "r+b") as f:
        f.seek(block * 4096 + 100)
        f.write(b"\xff" * 64)  # inside the directory's only block: its checksum fails
        f.seek(int(where[1]) * 4096 + int(where[2], 16) + 0x28)
        f.write(b"\xa5" * 16)  # inside g2's inode: its checksum fails
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro,loop,noload", str(image), str(mnt)], check=True,
                   timeout=60)  # fmt: skip
    try:
        result = _restore(str(mnt), str(tmp_path / "dest"))
    finally:
        unmount(mnt)
    assert result.returncode == EXIT_PARTIAL, result
    assert result.stderr.splitlines() == _failed_lines(
        ("bad", "Bad message"), ("good/g2", "Bad message")
    )
    got = sorted(str(p.relative_to(tmp_path / "dest")) for p in (tmp_path / "dest").rglob("*")
                 if p.is_file() and not p.name.startswith(".backupfs"))  # fmt: skip
    assert got == ["good/g1", "good/g3", "top"]
    assert (tmp_path / "dest/good/g3").read_text() == "good/g3"


def _debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, check=True, timeout=60).stdout  # fmt: skip
