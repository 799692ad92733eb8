"""The userspace ext2/3/4 reader and the metadata walk on crafted images: real ones made
by mke2fs -d, then edited where a hostile backup would. Every crafted structure must be
refused quickly, in little memory, with NotExt4 (the walk logs it and stops), and no
name from the image may become a host path outside the tree it was found in."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import subprocess
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from backupfs.plan import readplan
from backupfs.plan.ext4meta import ROOT_INODE, Ext4, Inode, NotExt4
from backupfs.plan.metaprefetch import FileMap, Walked, prefetch

SB = 1024  # the superblock's offset in a bare filesystem


class TooSlow(BaseException):
    """Raised by `deadline` from a signal handler: nothing in the code under test
    catches a BaseException, so it ends whatever loop it interrupts."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise TooSlow(f"took longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def bounded(seconds: float = 1.0, peak_bytes: int = 4 << 20) -> Iterator[None]:
    """The block must end within `seconds` and allocate at most `peak_bytes` at once."""
    tracemalloc.start()
    try:
        with deadline(seconds):
            yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= peak_bytes, f"allocated {peak} bytes at once"


def make_fs(path: Path, tree: Callable[[Path], None], *opts: str, size: str = "16M") -> Path:
    """A bare ext2/3/4 filesystem image (partition start 0) holding what `tree` makes."""
    src = path.parent / f"{path.name}.src"
    src.mkdir()
    tree(src)
    fixed = ["-U", "6b0f423a-0000-4000-8000-000000000001", "-E", f"hash_seed={uuid.UUID(int=7)}"]
    cmd = ["mke2fs", "-q", "-F", *fixed, *opts, "-d", str(src), str(path), size]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return path


def small_tree(root: Path) -> None:
    (root / "a").mkdir()
    (root / "a" / "inner.txt").write_text("inner\n")
    (root / "big").mkdir()
    for i in range(100):
        (root / "big" / f"file-{i:03d}").write_text(str(i))
    pad = random.Random(0).randbytes(64 << 10)  # the same image each time
    (root / "pad.bin").write_bytes(pad)  # blocks to put crafted nodes in
    for name in ("Zdev%watchdog", "Za%b", "Znul%x", "Zempty", "Zdotdot"):
        (root / name).write_text(name)


def reader(path: Path, max_reads: int = 1000) -> Callable[[int, int], bytes]:
    """Reads of the image file that fail the test after `max_reads` calls."""
    calls = 0

    def read(offset: int, length: int) -> bytes:
        nonlocal calls
        calls += 1
        assert calls <= max_reads, "the reader kept reading"
        with open(path, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    return read


def patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


class Image:
    """A filesystem image and where things are in it, found before it is edited."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fs = Ext4(reader(path), 0)

    def inode(self, number: int) -> Inode:
        start, end = self.fs.inode_range(number)
        return self.fs.parse_inode(number, self.fs.read(start, end - start))

    def data(self, number: int) -> bytes:
        return b"".join(self.fs.read(s, e - s) for s, e in self.fs.data_ranges(self.inode(number)))

    def lookup(self, *names: str) -> int:
        number = ROOT_INODE
        for name in names:
            entries = self.fs.entries(self.inode(number), self.data(number))
            number = next(e.inode for e in entries if e.name == name.encode())
        return number

    def inode_at(self, number: int) -> int:
        return self.fs.inode_range(number)[0]

    def blocks_of(self, number: int) -> list[int]:
        bs = self.fs.block_size
        return [
            b for s, e in self.fs.data_ranges(self.inode(number)) for b in range(s // bs, e // bs)
        ]

    def rename(self, old: str, new: bytes) -> None:
        """Overwrite a root entry's name in place (same length, or shorter via name_len)."""
        (block,) = self.blocks_of(ROOT_INODE)
        bs = self.fs.block_size
        with open(self.path, "r+b") as f:
            data = bytearray(os.pread(f.fileno(), bs, block * bs))
            at = data.index(old.encode()) - 8
            assert data[at + 6] == len(old)
            data[at + 6] = len(new)
            data[at + 8 : at + 8 + len(new)] = new
            os.pwrite(f.fileno(), bytes(data), block * bs)


@pytest.fixture
def ext4(tmp_path: Path) -> Image:
    return Image(make_fs(tmp_path / "ext4.img", small_tree, "-t", "ext4", "-b", "4096"))


# -- names from the image -----------------------------------------------------------------


def test_entries_whose_names_are_no_file_names_are_skipped_and_counted(ext4: Image) -> None:
    ext4.rename("Zdev%watchdog", b"/dev/watchdog")
    ext4.rename("Za%b", b"a/b")
    ext4.rename("Znul%x", b"nul\0x")
    ext4.rename("Zempty", b"")
    ext4.rename("Zdotdot", b"..")  # the reader never yields . and .. (nor counts them)
    walked = prefetch(str(ext4.path), 0, [(ROOT_INODE, None)])
    assert walked.errors == []
    rels = sorted(f.rel for f in walked.files.values())
    assert rels == sorted([b"a/inner.txt", b"pad.bin"] + [b"big/file-%03d" % i for i in range(100)])
    assert walked.skipped_names == 4


def test_walked_files_never_leave_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    walked = Walked()
    rels = [b"/dev/watchdog", b"../../etc/shadow", b"d/../../x", b"./d/f", b"d//f", b"d/f\0x",
            b"", b"..", b".", b"d/", b"d/f"]  # fmt: skip
    for number, rel in enumerate(rels, start=12):
        walked.files[number] = FileMap(rel, 10, None)
    files = readplan.walked_files(str(root), walked)
    assert [(p, n) for p, _, n in files] == [(str(root / "d" / "f"), 12 + len(rels) - 1)]


def _map_in_thread(files: list[tuple[str, int, int]], fifos: list[Path]) -> list[tuple[int, int]]:
    """image_ranges in a thread; a FIFO it opens for reading blocks it, so after a second
    the FIFOs are opened for writing (which frees it) and the test fails."""
    source = readplan.ImageSource("/nonexistent", "disk.img", 1 << 20, "ext4")
    out: list[tuple[int, int]] = []
    thread = threading.Thread(target=lambda: out.extend(readplan.image_ranges(source, files)))
    thread.start()
    thread.join(1.0)
    blocked = thread.is_alive()
    for fifo in fifos:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    thread.join(5.0)
    assert not blocked, "a FIFO named by the image was opened, and blocked"
    return out


def test_plans_open_no_path_outside_the_walked_tree(tmp_path: Path) -> None:
    """Names a walk found, made into paths by walked_files, mapped by FIEMAP: a
    name with "/" or "..", or a symlinked directory on the way, must not reach the
    FIFO outside (which would block an open for reading: a device could do worse)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    fifo = outside / "fifo"
    os.mkfifo(fifo)
    (root / "lnk").symlink_to(outside)
    walked = Walked()
    for number, rel in enumerate([os.fsencode(fifo), b"../outside/fifo", b"lnk/fifo"], 12):
        walked.files[number] = FileMap(rel, 10, None)
    assert _map_in_thread(readplan.walked_files(str(root), walked), [fifo]) == []


def test_fiemap_opens_no_fifo_or_device(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    files = [(str(fifo), 10, 0), ("/dev/null", 10, 0), (str(tmp_path), 10, 0)]
    assert _map_in_thread(files, [fifo]) == []


# -- crafted structures -------------------------------------------------------------------


def _blocks_count(path: Path) -> int:
    with open(path, "rb") as f:
        return int(struct.unpack("<I", os.pread(f.fileno(), 4, SB + 4))[0])


def _extent_header(entries: int, most: int, depth: int) -> bytes:
    return struct.pack("<4HI", 0xF30A, entries, most, depth, 0)


def _index(logical: int, child: int) -> bytes:
    return struct.pack("<IIHH", logical, child & 0xFFFFFFFF, child >> 32, 0)


def _set_root(image: Image, number: int, root: bytes, size: int | None = None) -> None:
    at = image.inode_at(number)
    patch(image.path, at + 40, f"{len(root)}s", root)
    if size is not None:
        patch(image.path, at + 4, "<I", size)


def _refused(image: Image, number: int) -> None:
    """The inode's data is refused by a fresh reader, fast and in little memory; and
    the walk over the image reports it and stops."""
    with bounded(), pytest.raises(NotExt4):
        fs = Ext4(reader(image.path), 0)
        start, end = fs.inode_range(number)
        fs.data_ranges(fs.parse_inode(number, fs.read(start, end - start)))
    with bounded(peak_bytes=8 << 20):
        walked = prefetch(str(image.path), 0, [(ROOT_INODE, None)])
    assert len(walked.errors) == 1


def test_a_dag_of_extent_index_nodes_is_refused(ext4: Image) -> None:
    """root -> 4 x A -> 340 x B -> 340 x leaf: 462,400 leaves, 3 blocks."""
    a, b, leaf = ext4.blocks_of(ext4.lookup("pad.bin"))[:3]
    most = (4096 - 12) // 12
    with open(ext4.path, "r+b") as f:
        f.seek(a * 4096)
        f.write(_extent_header(most, most, 2) + b"".join(_index(i, b) for i in range(most)))
        f.seek(b * 4096)
        f.write(_extent_header(most, most, 1) + b"".join(_index(i, leaf) for i in range(most)))
        f.seek(leaf * 4096)
        f.write(_extent_header(1, most, 0) + struct.pack("<IHHI", 0, 1, 0, leaf))
    big = ext4.lookup("big")
    root = _extent_header(4, 4, 3) + b"".join(_index(i, a) for i in range(4))
    _set_root(ext4, big, root, size=4 << 20)  # 1024 blocks: room for 340 + 340 entries
    _refused(ext4, big)


def test_a_cycle_of_extent_index_nodes_is_refused(ext4: Image) -> None:
    """A names 339 leaves and itself: walked as deep as the tree may be, it would be
    read again on every level, its leaves 339 times each."""
    a, leaf = ext4.blocks_of(ext4.lookup("pad.bin"))[:2]
    most = (4096 - 12) // 12
    with open(ext4.path, "r+b") as f:
        f.seek(a * 4096)
        names = [_index(i, leaf) for i in range(most - 1)] + [_index(most - 1, a)]
        f.write(_extent_header(most, most, 1) + b"".join(names))
        f.seek(leaf * 4096)
        extents = [struct.pack("<IHHI", i, 1, 0, leaf) for i in range(most)]
        f.write(_extent_header(most, most, 0) + b"".join(extents))
    big = ext4.lookup("big")
    root = _extent_header(1, 4, 2) + _index(0, a)
    _set_root(ext4, big, root, size=4 << 20)
    _refused(ext4, big)


def test_extents_beyond_the_inode_size_are_refused(ext4: Image) -> None:
    number = ext4.lookup("a")  # one block, 4096 bytes: map eight
    (block,) = ext4.blocks_of(number)
    _set_root(ext4, number, _extent_header(1, 4, 0) + struct.pack("<IHHI", 0, 8, 0, block))
    _refused(ext4, number)


def test_blocks_past_the_filesystem_are_refused(ext4: Image) -> None:
    number = ext4.lookup("a")
    far = _blocks_count(ext4.path) + 10
    _set_root(ext4, number, _extent_header(1, 4, 0) + struct.pack("<IHHI", 0, 1, 0, far))
    _refused(ext4, number)


def test_an_inode_table_past_the_filesystem_is_refused(ext4: Image) -> None:
    patch(ext4.path, 4096 + 8, "<I", 1 << 30)  # group 0's inode table
    with bounded(), pytest.raises(NotExt4):
        Ext4(reader(ext4.path), 0).inode_range(ROOT_INODE)


def test_a_filesystem_larger_than_its_device_is_refused(ext4: Image) -> None:
    patch(ext4.path, SB + 4, "<I", _blocks_count(ext4.path) * 4)
    with bounded():
        walked = prefetch(str(ext4.path), 0, [(ROOT_INODE, None)])
    assert walked.inodes == 0 and len(walked.errors) == 1 and "device" in walked.errors[0]


def test_a_directory_larger_than_the_reader_reads_is_refused(tmp_path: Path) -> None:
    """A 128 MiB directory, all of its blocks inside its (256 MiB) filesystem: refused
    before a byte of it is read."""
    image = Image(make_fs(tmp_path / "big.img", small_tree, "-t", "ext4", "-b", "4096",
                          size="256M"))  # fmt: skip
    number = image.lookup("a")
    extent = struct.pack("<IHHI", 0, 1 << 15, 0, _blocks_count(image.path) - (1 << 15))
    _set_root(image, number, _extent_header(1, 4, 0) + extent, size=128 << 20)
    _refused(image, number)


def test_self_referencing_indirect_blocks_are_refused(tmp_path: Path) -> None:
    image = Image(make_fs(tmp_path / "ext2.img", small_tree, "-t", "ext2", "-b", "4096"))
    number = image.lookup("a")
    (own,) = image.blocks_of(number)
    (loop,) = image.blocks_of(image.lookup("a", "inner.txt"))
    patch(image.path, loop * 4096, "<1024I", *[loop] * 1024)
    pointers = [own] + [0] * 11 + [loop, loop, loop]
    _set_root(image, number, struct.pack("<15I", *pointers), size=8 << 20)
    _refused(image, number)


@pytest.mark.parametrize("desc_size", [0, 8, 32, 48, 2048, 65535])
def test_odd_group_descriptor_sizes_are_refused(ext4: Image, desc_size: int) -> None:
    patch(ext4.path, SB + 254, "<H", desc_size)  # a 64bit filesystem: at least 64
    with bounded(), pytest.raises(NotExt4):
        Ext4(reader(ext4.path), 0)


@pytest.mark.parametrize(
    ("inodes_count", "per_group"), [(1 << 20, 1), (0xFFFFFFFF, 4096), (1 << 24, 32768)]
)
def test_inode_and_group_counts_that_would_fill_memory_are_refused(
    tmp_path: Path, inodes_count: int, per_group: int
) -> None:
    """Counts that would mean a huge group descriptor table: refused before it is read,
    here with 80 MiB of image (sparse) behind the filesystem for it to be read from."""
    image = make_fs(tmp_path / "ext4.img", small_tree, "-t", "ext4", "-b", "4096")
    os.truncate(image, 80 << 20)
    patch(image, SB, "<I", inodes_count)
    patch(image, SB + 40, "<I", per_group)
    with bounded(), pytest.raises(NotExt4):
        Ext4(reader(image), 0)
    with bounded():
        walked = prefetch(str(image), 0, [(ROOT_INODE, None)])
    assert len(walked.errors) == 1


def test_the_walk_is_not_slowed_by_the_checks(tmp_path: Path) -> None:
    """The checks cost little on a real image: 100 files, a few directories."""
    image = make_fs(tmp_path / "ext4.img", small_tree, "-t", "ext4")
    started = time.monotonic()
    walked = prefetch(str(image), 0, [(ROOT_INODE, None)])
    assert walked.errors == [] and len(walked.files) == 2 + 100 + 5
    assert time.monotonic() - started < 1.0


def test_a_start_that_is_no_directory_walks_nothing(ext4: Image) -> None:
    """Found by the fuzz test: the root inode damaged into a regular file was a file
    with an empty path."""
    patch(ext4.path, ext4.inode_at(ROOT_INODE), "<H", 0o100644)
    walked = prefetch(str(ext4.path), 0, [(ROOT_INODE, None)])
    assert walked.errors == [] and walked.inodes == 1 and walked.files == {}
