"""`backupfs restore` of large files copied in pieces by several readers (pieces.py) with
the kernel's copies (fastcopy.py): the bytes and metadata arrive whole, holes stay holes,
an interrupt leaves no temporary file, a failing read fails that file only, and through
an attachment the pieces are read through every clone.

The split threshold and piece size are lowered (module constants) so a 40 MiB file is
cut into 1 MiB pieces; restores run in this process so the constants apply.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupfs.cli.parser import build_parser
from backupfs.errors import EXIT_OK, EXIT_PARTIAL
from backupfs.restore import fastcopy, pieces
from backupfs.store.indexer import index_store
from tests.support.attachment import attached, sectors_read, served_store
from tests.support.fsimages import flip_byte_of_file
from tests.support.kernel import needs_filesystems
from tests.support.mounting import sha256_file
from tests.support.system import unmount

MiB = 1 << 20
MARKER = ".backupfs-restore-in-progress"
TMP_PREFIX = ".backupfs-tmp."
BIG = 40 * MiB
Taken = tuple[pieces.Span, tuple[int, int]] | None  # what Board._take hands a worker
# (offset, length) of the data in a 64 MiB sparse file: across piece boundaries, a lone
# byte, and the very end
ISLANDS = [(0, 100_000), (7 * MiB + 4096, 2 * MiB + 123), (33 * MiB, 1), (64 * MiB - 4096, 4096)]


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pieces, "SPLIT_BYTES", 8 * MiB)
    monkeypatch.setattr(pieces, "PIECE_BYTES", 1 * MiB)
    monkeypatch.setattr(fastcopy, "WRITEBACK_BYTES", 4 * MiB)


def _restore(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`backupfs restore ARGS` in this process, so the patched constants apply."""
    parsed = build_parser().parse_args(["restore", *args])
    rc = parsed.func(parsed)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _data_map(path: Path) -> list[tuple[int, int]]:
    """Where the file holds data, by SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, out = os.fstat(fd).st_size, 0, []
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            out.append((pos, end))
            pos = end
        return out
    finally:
        os.close(fd)


def _leftovers(dest: Path) -> list[Path]:
    return [p for p in dest.rglob("*") if p.name.startswith(TMP_PREFIX)]


@dataclass
class Copies:
    """Every piece copied: (thread id, device of its source, inode of its copy)."""

    seen: list[tuple[int, int, int]]

    def threads(self, ino: int) -> set[int]:
        return {t for t, _, i in self.seen if i == ino}

    def devices(self, ino: int) -> set[int]:
        return {d for _, d, i in self.seen if i == ino}


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> Copies:
    """Records every piece copied. The first piece of a split file waits (10 s at most)
    until a second thread copies a piece of it too, so a test sees helpers whenever they
    can come at all, however fast the first reader is."""
    record, lock = Copies([]), threading.Lock()
    helped: dict[int, threading.Event] = {}
    copy = fastcopy.RangeCopier.copy

    def recorded(self: fastcopy.RangeCopier, pos: int, end: int) -> None:
        me, src, ino = threading.get_ident(), os.fstat(self.src), os.fstat(self.dst).st_ino
        with lock:
            first = not record.threads(ino)
            record.seen.append((me, src.st_dev, ino))
            event = helped.setdefault(ino, threading.Event())
            if len(record.threads(ino)) > 1:
                event.set()
        if first and pieces.splits(src.st_size):
            event.wait(10)
        copy(self, pos, end)

    monkeypatch.setattr(fastcopy.RangeCopier, "copy", recorded)
    return record


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(BIG + 12345))  # not a multiple of a piece
    os.setxattr(src / "big.bin", "user.color", b"blue")
    os.chmod(src / "big.bin", 0o640)
    os.utime(src / "big.bin", ns=(1_600_000_000_000_000_001, 1_600_000_000_123_456_789))
    with open(src / "sparse.img", "wb") as f:
        f.truncate(64 * MiB)
        for offset, length in ISLANDS:
            f.seek(offset)
            f.write(os.urandom(length))
    for i in range(20):
        (src / f"small-{i:02}").write_bytes(os.urandom(i * 1000))
    return src


def _digests(root: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in root.iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("way", fastcopy.WAYS)
@pytest.mark.parametrize("dest_fs", ["same", "tmpfs"])
def test_a_split_file_arrives_whole_by_every_way(
    tmp_path: Path,
    source: Path,
    copies: Copies,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    way: str,
    dest_fs: str,
) -> None:
    """Four readers on one root (allowed here) copy pieces of each file; from the same
    filesystem copy_file_range works, to a tmpfs it is refused (EXDEV) and read/write
    takes over; each way, started with, gives the same bytes, holes and metadata."""
    monkeypatch.setattr(pieces, "WORKERS_PER_ROOT", 4)
    monkeypatch.setattr(fastcopy, "FIRST_WAY", fastcopy.WAYS.index(way))
    dest = tmp_path / "dest"
    if dest_fs == "tmpfs":
        dest.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(dest)],
                       check=True)  # fmt: skip
    want = os.stat(source / "big.bin")
    try:
        rc, out, err = _restore(capsys, "--jobs", "4", str(source), str(dest / "r"))
        assert rc == EXIT_OK, err
        st = os.stat(dest / "r/big.bin")  # before reading it changes its atime
        assert (st.st_mode, st.st_mtime_ns, st.st_atime_ns) == (
            want.st_mode, want.st_mtime_ns, want.st_atime_ns
        )  # fmt: skip
        assert _digests(dest / "r") == _digests(source)
        assert _data_map(dest / "r/sparse.img") == _data_map(source / "sparse.img")
        blocks = os.stat(dest / "r/sparse.img").st_blocks  # + an extent block or a few
        assert blocks <= os.stat(source / "sparse.img").st_blocks + 64
        assert os.getxattr(dest / "r/big.bin", "user.color") == b"blue"
        assert _leftovers(dest) == []
        for name in ("big.bin", "sparse.img"):  # helpers copied pieces of each
            assert len(copies.threads(os.stat(dest / "r" / name).st_ino)) > 1, name
    finally:
        if dest_fs == "tmpfs":
            unmount(dest)


def test_the_owner_waits_for_a_helper_between_two_pieces(
    tmp_path: Path,
    source: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The helper pauses after its first piece, before taking the next, until the owner
    has found nothing left to take: the owner must wait for it (it still holds a piece of
    its span and writes through the owner's descriptor), not finish the file without it."""
    monkeypatch.setattr(pieces, "WORKERS_PER_ROOT", 2)
    owner_done, owners = threading.Event(), set()
    late: list[tuple[int, int]] = []  # pieces the helper copied once the owner was done
    run, take, copy = pieces.Board.run, pieces.Board._take, fastcopy.RangeCopier.copy

    def owning(self: pieces.Board, job: pieces.SplitCopy, src_fd: int, root: str) -> None:
        owners.add(threading.get_ident())
        run(self, job, src_fd, root)

    def pausing(self: pieces.Board, job: pieces.SplitCopy, mine: pieces.Span | None) -> Taken:
        helper = threading.get_ident() not in owners
        if helper and mine is not None:
            owner_done.wait(10)
        got = take(self, job, mine)
        if not helper and got is None:
            owner_done.set()
        return got

    def copying(self: fastcopy.RangeCopier, pos: int, end: int) -> None:
        if threading.get_ident() not in owners and owner_done.is_set():
            late.append((pos, end))
        copy(self, pos, end)

    monkeypatch.setattr(pieces.Board, "run", owning)
    monkeypatch.setattr(pieces.Board, "_take", pausing)
    monkeypatch.setattr(fastcopy.RangeCopier, "copy", copying)
    dest = tmp_path / "dest"
    rc, _, err = _restore(capsys, "--jobs", "2", str(source / "big.bin"), str(dest))
    assert rc == EXIT_OK, err
    assert owner_done.is_set() and late, "the helper never came, or had nothing left"
    assert sha256_file(dest / "big.bin") == sha256_file(source / "big.bin")
    assert _leftovers(dest) == []


def test_an_interrupt_mid_piece_leaves_no_temporary_file(
    tmp_path: Path,
    source: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C while three readers copy pieces of big.bin: the restore stops, its temporary
    file is gone, the marker stays; the same command then completes it."""
    monkeypatch.setattr(pieces, "WORKERS_PER_ROOT", 4)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    copy, calls, lock = fastcopy.RangeCopier.copy, [0], threading.Lock()

    def interrupting(self: fastcopy.RangeCopier, pos: int, end: int) -> None:
        with lock:
            calls[0] += 1
            now = calls[0] == 5
        if now:  # like Ctrl-C: the signal goes to the main thread, which sets stop
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            assert self.stop.wait(10)
        copy(self, pos, end)

    monkeypatch.setattr(fastcopy.RangeCopier, "copy", interrupting)
    dest = tmp_path / "dest"
    try:
        with pytest.raises(KeyboardInterrupt):
            _restore(capsys, "--jobs", "3", str(source / "big.bin"), str(dest))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls[0] >= 5
    assert _leftovers(dest) == []
    assert not (dest / "big.bin").exists()
    assert (dest / MARKER).exists()

    monkeypatch.setattr(fastcopy.RangeCopier, "copy", copy)
    rc, _, err = _restore(capsys, str(source / "big.bin"), str(dest))
    assert rc == EXIT_OK, err
    assert sha256_file(dest / "big.bin") == sha256_file(source / "big.bin")
    assert not (dest / MARKER).exists() and _leftovers(dest) == []


# --- through an attachment with two clones ------------------------------------------------


@dataclass(frozen=True)
class Backup:
    root: Path  # the attached filesystem, clone 0
    env: dict[str, str]
    sums: dict[str, str]


def _attached_backup(tmp_path: Path, run_env: dict[str, str], bad: bool) -> Iterator[Backup]:
    """good.bin and bad.bin (40 MiB each) and small files in an ext4 image, served, mounted
    and attached with two clones; with `bad`, one byte of bad.bin, 30 MiB in (in its
    second half, the span a reader on the other clone takes), is corrupted in the store
    after indexing."""
    tree, store = tmp_path / "tree", tmp_path / "store"
    tree.mkdir()
    sums = {}
    for name, size in (("good.bin", BIG), ("bad.bin", BIG), ("a", 5000), ("b", 3 * MiB)):
        data = os.urandom(size)
        (tree / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    image = store / "h" / "2026-01-01" / "disk.img"
    image.parent.mkdir(parents=True)
    subprocess.run(["mkfs.ext4", "-q", "-b", "4096", "-d", str(tree), str(image), "128M"],
                   check=True)  # fmt: skip
    index_store(store, say=lambda _: None)
    if bad:
        flip_byte_of_file(image, "/bad.bin", 30 * MiB // 4096)
    with (
        served_store(store, tmp_path, "retries=0", index=False) as served,  # a bad digest: EIO
        attached(
            served.image("h/2026-01-01/disk.img"), tmp_path / "attached", run_env, "--clones", "2"
        ) as att,
    ):
        yield Backup(att.target / "p0", att.env, sums)


@pytest.fixture
def backup(
    tmp_path: Path, run_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backup]:
    monkeypatch.setenv("BACKUPFS_RUN_DIR", run_env["BACKUPFS_RUN_DIR"])
    yield from _attached_backup(tmp_path, run_env, bad=False)


@pytest.fixture
def bad_backup(
    tmp_path: Path, run_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backup]:
    monkeypatch.setenv("BACKUPFS_RUN_DIR", run_env["BACKUPFS_RUN_DIR"])
    yield from _attached_backup(tmp_path, run_env, bad=True)


@needs_filesystems("ext4")
def test_the_pieces_of_a_file_are_read_through_every_clone(
    tmp_path: Path, backup: Backup, copies: Copies, capsys: pytest.CaptureFixture[str]
) -> None:
    """One file, one root per clone, one reader per root on it (WORKERS_PER_ROOT): both
    loop devices read a good part of it (by read/write: the copy is on another
    filesystem than the attachment, copy_file_range says EXDEV)."""
    before = sectors_read(backup.env)
    rc, _, err = _restore(capsys, str(backup.root / "good.bin"), str(tmp_path / "dest"))
    assert rc == EXIT_OK, err
    after = sectors_read(backup.env)
    assert sha256_file(tmp_path / "dest/good.bin") == backup.sums["good.bin"]
    assert len(after) == 2
    assert all(after[d] - before[d] >= 8 * MiB // 512 for d in after), (before, after)
    ino = os.stat(tmp_path / "dest/good.bin").st_ino
    assert len(copies.devices(ino)) == 2  # pieces copied through both clones
    assert _leftovers(tmp_path / "dest") == []


@needs_filesystems("ext4")
def test_a_failing_read_in_one_piece_fails_that_file_only(
    tmp_path: Path, bad_backup: Backup, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupted block in bad.bin's second half (EIO through the mount, the loop device
    and ext4): bad.bin is reported once, its temporary file removed; good.bin, split the
    same way, and the small files are restored."""
    dest = tmp_path / "dest"
    rc, _, err = _restore(capsys, str(bad_backup.root), str(dest))
    assert rc == EXIT_PARTIAL
    assert err.splitlines() == [
        "backupfs: failed: bad.bin: Input/output error",
        "backupfs: 1 file failed, the rest was restored",
    ]
    restored = {p.name: sha256_file(p) for p in dest.iterdir()
                if stat.S_ISREG(p.lstat().st_mode) and not p.name.startswith(".")}  # fmt: skip
    assert restored == {k: v for k, v in bad_backup.sums.items() if k != "bad.bin"}
    assert _leftovers(dest) == []
    assert (dest / MARKER).exists()  # not complete: a re-run tries bad.bin again
