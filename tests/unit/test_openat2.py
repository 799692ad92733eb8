"""openat2(2) through ctypes (backupfs/linux/openat2.py), and restore's DEST tree built on
it (backupfs/restore/desttree.py): directories reached from DEST's descriptor without
following a symlink, with openat2 and with the component-by-component fallback, a bounded
descriptor cache, and each unusable directory reported once."""

import ctypes
import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupfs.linux import openat2
from backupfs.restore.desttree import NOT_FOLLOWED, Blocked, DestTree, Skipped, join

BENEATH = openat2.RESOLVE_BENEATH | openat2.RESOLVE_NO_SYMLINKS
DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _kernel_has_openat2() -> bool:
    fd = os.open("/", DIR)
    try:
        return openat2.supported(fd)
    finally:
        os.close(fd)


HAS_OPENAT2 = _kernel_has_openat2()
needs_openat2 = pytest.mark.skipif(not HAS_OPENAT2, reason="the kernel has no openat2 (< 5.6)")


@pytest.fixture
def root(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, DIR)
    yield fd
    os.close(fd)


def _same(fd: int, path: Path) -> bool:
    st, want = os.fstat(fd), os.lstat(path)
    return (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino)


# --- the kernel ABI ----------------------------------------------------------------------


def test_open_how_is_three_u64_in_order() -> None:
    assert openat2.OpenHow.flags.offset == 0
    assert openat2.OpenHow.mode.offset == 8
    assert openat2.OpenHow.resolve.offset == 16
    assert ctypes.sizeof(openat2.OpenHow) == 24


def test_syscall_number_only_where_it_is_the_unified_one() -> None:
    assert openat2.syscall_number("x86_64") == 437
    assert openat2.syscall_number("aarch64") == 437
    assert openat2.syscall_number("alpha") is None  # 547 there: never call 437 by mistake
    assert openat2.syscall_number("mips64") is None


def test_supported_says_no_for_a_bad_descriptor() -> None:
    assert openat2.supported(-1) is False


@needs_openat2
def test_opens_a_path_beneath(tmp_path: Path, root: int) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    fd = openat2.openat2(root, "a/b", DIR, resolve=BENEATH)
    try:
        assert _same(fd, tmp_path / "a/b")
    finally:
        os.close(fd)


@needs_openat2
@pytest.mark.parametrize("path", ["link", "link/inner", "a/link-to-a"])
def test_a_symlink_anywhere_is_refused(tmp_path: Path, root: int, path: str) -> None:
    (tmp_path / "a/inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to("a")
    (tmp_path / "a/link-to-a").symlink_to(".")
    with pytest.raises(OSError) as caught:
        openat2.openat2(root, path, DIR, resolve=BENEATH)
    assert caught.value.errno == errno.ELOOP
    assert caught.value.filename == path


@needs_openat2
@pytest.mark.parametrize("path", ["..", "a/../..", "/etc"])
def test_a_path_leaving_the_directory_is_refused(tmp_path: Path, root: int, path: str) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(OSError) as caught:
        openat2.openat2(root, path, DIR, resolve=BENEATH)
    assert caught.value.errno == errno.EXDEV


@needs_openat2
def test_creates_with_flags_and_mode(tmp_path: Path, root: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = openat2.openat2(root, "new", flags, 0o600, resolve=BENEATH)
    os.write(fd, b"x")
    os.close(fd)
    assert (tmp_path / "new").read_bytes() == b"x"
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        openat2.openat2(root, "new", flags, 0o600, resolve=BENEATH)


def test_a_null_byte_is_refused_not_cut(root: int) -> None:
    with pytest.raises(OSError) as caught:
        openat2.openat2(root, "a\0/../..", DIR, resolve=BENEATH)
    assert caught.value.errno == errno.EINVAL


# --- DEST as restore writes it, with openat2 and without ----------------------------------


@pytest.fixture(params=[True, False], ids=["openat2", "fallback"])
def tree(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DestTree]:
    if request.param and not HAS_OPENAT2:
        pytest.skip("the kernel has no openat2")
    (tmp_path / "dest").mkdir()
    t = DestTree.open(str(tmp_path / "dest"), use_openat2=request.param)
    yield t
    t.close()


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "victim").write_text("keep me")
    return out


def test_join() -> None:
    assert join("", "") == ""
    assert join("a", "") == "a"
    assert join("", "b/c") == "b/c"
    assert join("a", "b/c") == "a/b/c"


def test_mkdir_makes_or_finds_a_directory(tree: DestTree, tmp_path: Path) -> None:
    assert tree.mkdir("a") is True
    assert tree.mkdir("a/b") is True
    assert tree.mkdir("a") is False
    assert tree.made == {"a", "a/b"} and tree.existed == {"a"}
    assert stat.S_IMODE((tmp_path / "dest/a/b").stat().st_mode) == 0o700
    with tree.dir("a/b") as fd:
        assert _same(fd, tmp_path / "dest/a/b")


def test_a_symlinked_directory_is_blocked_once_then_skipped(tree: DestTree, tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    (tmp_path / "dest/a").mkdir()
    (tmp_path / "dest/a/link").symlink_to(outside)
    with pytest.raises(Blocked) as first:
        tree.mkdir("a/link")
    assert (first.value.rel, first.value.strerror, first.value.errno) == (
        "a/link", NOT_FOLLOWED, errno.ELOOP,
    )  # fmt: skip
    with pytest.raises(Skipped) as again:
        tree.dir("a/link").__enter__()
    assert again.value.rel == "a/link"
    with pytest.raises(Skipped) as under:
        tree.mkdir("a/link/deeper")
    assert under.value.rel == "a/link"
    assert tree.failed == {"a/link": NOT_FOLLOWED}
    assert sorted(os.listdir(outside)) == ["victim"]
    assert tree.under_failed("a/link/x/y") and not tree.under_failed("a/linkx")


def test_a_symlink_on_the_way_is_named(tree: DestTree, tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    (outside / "b/c").mkdir(parents=True)
    (tmp_path / "dest/a").mkdir()
    (tmp_path / "dest/a/l").symlink_to(outside)
    with pytest.raises(Blocked) as caught:
        tree.dir("a/l/b/c").__enter__()
    assert caught.value.rel == "a/l" and caught.value.strerror == NOT_FOLLOWED


def test_a_file_where_a_directory_goes(tree: DestTree, tmp_path: Path) -> None:
    (tmp_path / "dest/f").write_text("x")
    with pytest.raises(Blocked) as caught:
        tree.mkdir("f")
    assert (caught.value.rel, caught.value.strerror) == ("f", "Not a directory")


def test_a_directory_swapped_after_use_is_resolved_again_after_reset(
    tree: DestTree, tmp_path: Path
) -> None:
    outside = _outside(tmp_path)
    tree.mkdir("sub")
    os.rmdir(tmp_path / "dest/sub")
    (tmp_path / "dest/sub").symlink_to(outside)
    tree.reset()
    with pytest.raises(Blocked) as caught:
        tree.dir("sub").__enter__()
    assert caught.value.rel == "sub"


def test_lstat_and_open_file_follow_no_symlink(tree: DestTree, tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    (tmp_path / "dest/d").mkdir()
    (tmp_path / "dest/d/link").symlink_to(outside / "victim")
    st = tree.lstat("d/link")
    assert st is not None and stat.S_ISLNK(st.st_mode)
    assert tree.lstat("d/nothing") is None
    with pytest.raises(OSError) as caught:
        tree.open_file("d/link", os.O_RDONLY)
    assert caught.value.errno == errno.ELOOP


def test_fsync_of_a_fifo_does_not_block(tree: DestTree, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "dest/fifo")
    (tmp_path / "dest/file").write_text("x")
    done = threading.Event()

    def run() -> None:
        tree.fsync("fifo")
        tree.fsync("file")
        tree.fsync("")
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert done.wait(10), "fsync opened the fifo and waited for a writer"


def test_the_cache_is_bounded_and_never_closes_a_leased_descriptor(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"d{i}").mkdir()
    tree = DestTree.open(str(tmp_path), capacity=2)
    try:
        with tree.dir("d0") as held:
            for i in range(1, 6):
                with tree.dir(f"d{i}"):
                    pass
            assert len(tree._slots) == 2
            assert _same(held, tmp_path / "d0")  # still open, still d0
        assert len(tree._slots) == 2
    finally:
        tree.close()
    assert not tree._slots


def test_threads_share_one_descriptor_per_directory(tree: DestTree, tmp_path: Path) -> None:
    tree.mkdir("shared")
    tree.reset()
    seen: list[int] = []
    barrier = threading.Barrier(8)

    def use() -> None:
        barrier.wait()
        for _ in range(200):
            with tree.dir("shared") as fd:
                assert _same(fd, tmp_path / "dest/shared")
                seen.append(fd)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 1600
    assert list(tree._slots) == ["shared"] and tree._slots["shared"].refs == 0
