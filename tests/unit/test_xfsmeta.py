"""The userspace XFS reader on real images made by mkfs.xfs from a protofile (no mount
needed), in v5 and v4 and several geometries, checked against the tree the protofile
describes and against xfs_db; and on crafted images, real ones edited where a hostile
backup would: every one must be refused quickly, in little memory, with NotXfs."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import pytest

from backupfs.plan.fsmeta import S_IFDIR, S_IFLNK, S_IFREG, FileInfo, FsError
from backupfs.plan.xfsmeta import MAX_DIR_BYTES, Damaged, NotXfs, Xfs

MIB = 1 << 20
SIZE = 300 * MIB  # the smallest xfs mkfs.xfs makes
OFFSET = MIB  # the filesystem starts 1 MiB into the "disk", as behind a partition table


# -- images from protofiles


@dataclass
class Node:
    kind: str  # "d", "f", "l", "c", "p"
    perm: int
    uid: int = 0
    gid: int = 0
    data: bytes = b""  # a file's bytes, a symlink's target
    children: dict[str, Node] = field(default_factory=dict)

    @property
    def mode(self) -> int:
        return TYPES[self.kind] | self.perm


TYPES = {"d": S_IFDIR, "f": S_IFREG, "l": S_IFLNK, "c": 0o020000, "p": 0o010000}


def _tree(long_link: bool) -> Node:
    rng = random.Random(5)
    root = Node("d", 0o755)
    few = root.children["few"] = Node("d", 0o750, 1000, 100)  # short-form
    few.children["a.txt"] = Node("f", 0o644, 1000, 100, b"abc\n")
    few.children["b.txt"] = Node("f", 0o600, 1001, 101, b"")
    few.children["c.txt"] = Node("f", 0o4755, 0, 0, rng.randbytes(5000))
    for name, count in (("block", 40), ("leaf", 300), ("node", 5000)):
        d = root.children[name] = Node("d", 0o755)
        for i in range(count):
            d.children[f"entry-{i:05d}-with-a-longer-name"] = Node("f", 0o644, data=b"x" * (i % 3))
    root.children["block"].children["n" * 255] = Node("f", 0o644, data=b"longest name")
    root.children["data.bin"] = Node("f", 0o644, 7, 8, rng.randbytes(200_000))
    root.children["big.bin"] = Node("f", 0o640, data=rng.randbytes(3 * MIB + 17))
    root.children["empty"] = Node("d", 0o2777)
    root.children["link"] = Node("l", 0o777, data=b"few/a.txt")
    root.children["inline-link"] = Node("l", 0o777, data=b"i" * 150)
    if long_link:  # xfsprogs 6.1 writes v5 remote symlinks without their block header
        root.children["long-link"] = Node("l", 0o777, data=b"L" * 1000)
    root.children["null"] = Node("c", 0o666)
    root.children["fifo"] = Node("p", 0o600)
    deep = root.children["sub"] = Node("d", 0o700)
    deep.children["deeper"] = Node("d", 0o755, children={"x": Node("f", 0o644, data=b"x\n")})
    return root


def _protofile(root: Node, src: Path) -> str:
    lines = ["/dev/null", "0 0", "d--755 0 0"]
    contents: dict[bytes, Path] = {}

    def perm(n: Node) -> str:
        t = "-" if n.kind == "f" else n.kind
        ug = ("u" if n.perm & 0o4000 else "-") + ("g" if n.perm & 0o2000 else "-")
        return f"{t}{ug}{n.perm & 0o777:03o}"

    def entries(d: Node) -> None:
        for name, n in d.children.items():
            head = f"{name} {perm(n)} {n.uid} {n.gid}"
            if n.kind == "d":
                lines.append(head)
                entries(n)
                lines.append("$")
            elif n.kind == "f":
                path = contents.get(n.data)
                if path is None:
                    path = contents[n.data] = src / f"{len(contents)}"
                    path.write_bytes(n.data)
                lines.append(f"{head} {path}")
            else:  # a symlink's target, a device's numbers, nothing for a fifo
                tail = {"l": n.data.decode(), "c": "1 3", "p": ""}[n.kind]
                lines.append(f"{head} {tail}".rstrip())

    entries(root)
    lines.append("$")
    return "\n".join(lines) + "\n"


def make_image(path: Path, root: Node, *opts: str) -> tuple[int, int]:
    """An XFS image of `root` at the start of `path`; the time span mkfs ran in."""
    src = path.parent / f"{path.name}.src"
    src.mkdir()
    proto = path.parent / f"{path.name}.proto"
    proto.write_text(_protofile(root, src))
    with open(path, "wb") as f:
        f.truncate(SIZE)
    before = time.time_ns() - 10**9  # the clock in the inode may be a little behind
    cmd = ["mkfs.xfs", "-q", "-f", *opts, "-p", str(proto), str(path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return before, time.time_ns() + 10**9


class Image:
    """The image file as a disk whose filesystem starts at OFFSET, with bytes patched."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, os.open(path, os.O_RDONLY)
        self.patches: dict[int, bytes] = {}

    def read(self, at: int, length: int) -> bytes:
        if at < OFFSET:
            return bytes(min(length, OFFSET - at))
        data = bytearray(os.pread(self.fd, length, at - OFFSET))
        for p_at, p in self.patches.items():
            lo, hi = max(at, p_at), min(at + len(data), p_at + len(p))
            if lo < hi:
                data[lo - at : hi - at] = p[lo - p_at : hi - p_at]
        return bytes(data)

    def fs(self) -> Xfs:
        return Xfs(self.read, OFFSET, SIZE)

    def close(self) -> None:
        os.close(self.fd)


def walk(fs: Xfs, deep: bool = True) -> Iterator[tuple[str, FileInfo]]:
    """Every path below the root and its inode; `deep=False` reads only the first 20
    inodes of each directory (the rest are listed)."""
    level = [("", fs.inode(fs.root))]
    while level:
        path, info = level.pop()
        for i, (name, number) in enumerate(fs.entries(info)):
            if not deep and i >= 20:
                continue
            child = fs.inode(number)
            yield path + "/" + name, child
            if child.is_dir:
                level.append((path + "/" + name, child))


def content(fs: Xfs, read: Callable[[int, int], bytes], info: FileInfo) -> bytes:
    """A file's bytes reassembled from its data runs; runs in order, inside the file."""
    out, pos = bytearray(), 0
    for run in fs.data_runs(info):
        assert run.file_offset >= pos and run.length > 0
        assert run.file_offset + run.length <= info.size
        out += bytes(run.file_offset - pos) + read(run.image_offset, run.length)
        pos = run.file_offset + run.length
    return bytes(out + bytes(info.size - pos))


def _expected(root: Node) -> dict[str, Node]:
    out: dict[str, Node] = {}
    level = [("", root)]
    while level:
        path, d = level.pop()
        for name, n in d.children.items():
            out[f"{path}/{name}"] = n
            level.append((f"{path}/{name}", n))
    return out


GEOMETRIES = {  # mkfs.xfs options
    "v5": "",
    "v5-1k-blocks-8k-dir-blocks": "-b size=1024 -n size=8192",
    "v5-2k-inodes-64k-dir-blocks": "-i size=2048 -n size=65536",
    "v5-64k-blocks": "-b size=65536",
    "v5-no-bigtime-nrext64-short-last-ag": "-m bigtime=0 -i nrext64=1 -d agsize=20000b",
    "v4": "-m crc=0",
    "v4-no-ftype-256-inodes": "-m crc=0 -n ftype=0 -i size=256",
    "v4-512-blocks": "-m crc=0 -b size=512",
}


@pytest.mark.parametrize("opts", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_reads_what_mkfs_wrote(tmp_path: Path, opts: str) -> None:
    v4 = "crc=0" in opts
    tree = _tree(long_link=v4)
    before, after = make_image(tmp_path / "xfs.img", tree, *opts.split())
    image = Image(tmp_path / "xfs.img")
    fs = image.fs()
    assert fs.version == (4 if v4 else 5)
    expected, seen = _expected(tree), {}
    root = fs.inode(fs.root)
    assert root.is_dir and root.nlink == 2 + 6  # few block leaf node empty sub
    for path, info in walk(fs):
        n = expected[path]
        assert info.mode == n.mode, path
        assert (info.uid, info.gid) == (n.uid, n.gid), path
        assert before <= info.mtime_ns <= after, path
        subdirs = sum(c.kind == "d" for c in n.children.values())
        assert info.nlink == (2 + subdirs if n.kind == "d" else 1), path
        assert info.record[1] - info.record[0] == fs.inode_size
        if n.kind in "fl":
            assert info.size == len(n.data), path
            assert content(fs, image.read, info) == n.data, path
        seen[path] = info.number
    assert seen.keys() == expected.keys()
    assert len(set(seen.values())) == len(seen)  # every inode its own
    if not v4:  # the numbers are XFS's own, as xfs_db finds them by path
        for path in ("/few/c.txt", "/node/entry-04999-with-a-longer-name", "/sub/deeper/x"):
            out = _xfs_db(image.path, f"path {path}", "p v3.inumber")
            assert int(out.split("=")[1]) == seen[path]


def _xfs_db(image: Path, *commands: str) -> str:
    cmd = ["xfs_db", "-r", *(a for c in commands for a in ("-c", c)), str(image)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="module")
def v5(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    path = tmp_path_factory.mktemp("xfs") / "v5.img"
    make_image(path, _tree(long_link=False))
    image = Image(path)
    yield image
    image.close()


def test_entries_are_in_directory_order_and_cached_inodes_stay_right(v5: Image) -> None:
    fs = v5.fs()
    top = dict(fs.entries(fs.inode(fs.root)))
    names = [n for n, _ in fs.entries(fs.inode(top["leaf"]))]
    assert names == [f"entry-{i:05d}-with-a-longer-name" for i in range(300)]
    again = [fs.inode(number) for _, number in fs.entries(fs.inode(top["node"]))]
    assert [i.size for i in again[:6]] == [0, 1, 2, 0, 1, 2]
    assert fs.data_runs(fs.inode(top["empty"])) == []
    assert fs.metadata_ranges(fs.inode(top["data.bin"])) == []


def test_v5_remote_symlink_without_header_is_refused(tmp_path: Path) -> None:
    """xfsprogs 6.1's protofile writes a long symlink of a v5 filesystem without the
    block header (xfs_repair clears such an inode): a real damaged image."""
    tree = Node("d", 0o755, children={"long": Node("l", 0o777, data=b"L" * 1000)})
    make_image(tmp_path / "bad.img", tree)
    image = Image(tmp_path / "bad.img")
    fs = image.fs()
    ((name, number),) = fs.entries(fs.inode(fs.root))
    info = fs.inode(number)
    assert info.is_symlink and info.size == 1000
    with pytest.raises(Damaged, match="symlink block"):
        fs.data_runs(info)
    image.close()


# -- hostile images: the v5 image with bytes patched where a crafted backup would


class TooSlow(BaseException):
    """Raised from a signal handler: nothing under test catches a BaseException."""


@contextlib.contextmanager
def bounded(seconds: float = 1.0, peak_bytes: int | None = 4 << 20) -> Iterator[None]:
    """The block must end within `seconds` and allocate at most `peak_bytes` at once
    (not traced if None: tracing slows it down several times)."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise TooSlow(f"took longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, fire)
    if peak_bytes is not None:
        tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak_bytes is None or peak <= peak_bytes, f"allocated {peak} bytes at once"


def be(width: int, value: int) -> bytes:
    return value.to_bytes(width, "big")


class Where:
    """Where things lie in the clean v5 image (found with the reader, checked above)."""

    def __init__(self, image: Image) -> None:
        self.image, self.fs = image, image.fs()
        self.numbers = {"/": self.fs.root} | {p: i.number for p, i in walk(self.fs, deep=False)}
        self.most = (self.fs.inode_size - 176 - 4) // 16  # keys in the inode's B+tree root
        self.leaf_fsbno = self.u64(self.at("fork:/node") + 4 + 8 * self.most)
        self.leaf = self.fs.at(self.fs.fsblock(self.leaf_fsbno, 1, ""))

    def at(self, where: str) -> int:
        """ "sb", "leaf" (the node directory's bmap B+tree leaf), "rec:PATH" (an inode),
        "fork:PATH" (its data fork), "block:PATH" (a directory's first block)."""
        kind, _, path = where.partition(":")
        if kind in ("sb", "leaf"):
            return OFFSET if kind == "sb" else self.leaf
        info = self.fs.inode(self.numbers[path])
        if kind == "block":
            return self.fs.metadata_ranges(info)[0][0]
        return info.record[0] + (176 if kind == "fork" else 0)

    def u32(self, at: int) -> int:
        return int.from_bytes(self.image.read(at, 4), "big")

    def u64(self, at: int) -> int:
        return int.from_bytes(self.image.read(at, 8), "big")

    def fsbno(self, at: int) -> int:
        """The on-disk block number of the extent record at `at`."""
        l0, l1 = struct.unpack(">QQ", self.image.read(at, 16))
        return (l0 & 0x1FF) << 43 | l1 >> 21

    def extent(self, at: int, **change: int) -> bytes:
        """The extent record at `at` with fields changed: offset, fsbno, count, flag."""
        l0, l1 = struct.unpack(">QQ", self.image.read(at, 16))
        f = {"offset": (l0 >> 9) & ((1 << 54) - 1), "fsbno": self.fsbno(at)}
        f |= {"count": l1 & 0x1FFFFF, "flag": l0 >> 63} | change
        l0 = f["flag"] << 63 | f["offset"] << 9 | f["fsbno"] >> 43
        return struct.pack(">QQ", l0, (f["fsbno"] & ((1 << 43) - 1)) << 21 | f["count"])


New = bytes | Callable[[Where, int], bytes]
SF, E1 = 6, 6 + 13  # a short-form header, then "a.txt": length, offset, name, type, inode
E = 96  # the first entry after . and .. in a v5 directory block
# what: (where, offset from there, new bytes), each refused with Damaged or NOT_XFS
NOT_XFS = {"sb-magic", "sb-version-3", "sb-unknown-incompat", "sb-needs-repair", "dir-too-big"}
CASES: dict[str, tuple[str, int, New]] = {
    "sb-magic": ("sb", 0, b"XFSC"),
    "sb-version-3": ("sb", 100, be(2, 0xB4A3)),
    "sb-unknown-incompat": ("sb", 216, be(4, 0x8000000B)),
    "sb-needs-repair": ("sb", 216, be(4, 0x1B)),
    "dir-too-big": ("rec:/leaf", 56, be(8, 2 * MAX_DIR_BYTES)),
    "sb-block-size": ("sb", 4, be(4, 4097)),
    "sb-block-log": ("sb", 120, b"\x0d"),
    "sb-sector-size": ("sb", 102, be(2, 0)),
    "sb-inode-size": ("sb", 104, be(2, 8192)),
    "sb-inodes-per-block": ("sb", 106, be(2, 0)),
    "sb-ag-blocks-0": ("sb", 84, be(4, 0)),
    "sb-ag-blocks-not-ag-log": ("sb", 84, be(4, 1 << 20)),
    "sb-ag-count-0": ("sb", 88, be(4, 0)),
    "sb-ag-count-huge": ("sb", 88, be(4, 2**32 - 1)),
    "sb-blocks-huge": ("sb", 8, be(8, 2**64 - 1)),
    "sb-blocks-past-the-ags": ("sb", 8, be(8, 4 * 19200 + 1)),
    "sb-mkfs-in-progress": ("sb", 126, b"\1"),
    "sb-dir-block-log": ("sb", 192, b"\x09"),
    "sb-root-outside": ("sb", 56, be(8, 1 << 62)),
    "sb-root-in-ag-headers": ("sb", 56, be(8, 1)),
    "inode-magic": ("rec:/", 0, b"XX"),
    "inode-version": ("rec:/few", 4, b"\2"),
    "inode-of-another-number": ("rec:/few", 152, be(8, 12345)),
    "inode-free": ("rec:/few/a.txt", 2, be(2, 0)),
    "file-inline": ("rec:/data.bin", 5, b"\1"),
    "dir-as-device": ("rec:/few", 5, b"\0"),
    "attr-fork-past-inode": ("rec:/data.bin", 82, b"\xff"),
    "extents-past-fork": ("rec:/data.bin", 76, be(4, 1000)),
    "size-negative": ("rec:/data.bin", 56, be(8, 1 << 63)),
    "inline-past-fork": ("rec:/few", 56, be(8, 1000)),
    "extent-of-0-blocks": ("fork:/data.bin", 0, lambda w, at: w.extent(at, count=0)),
    "extent-outside-ags": ("fork:/data.bin", 0, lambda w, at: w.extent(at, fsbno=7 << 15)),
    "extent-past-ag-end": ("fork:/data.bin", 0, lambda w, at: w.extent(at, fsbno=19199)),
    "extent-in-ag-headers": ("fork:/data.bin", 0, lambda w, at: w.extent(at, fsbno=1 << 15)),
    "extents-out-of-order": ("fork:/leaf", 0, lambda w, at: w.image.read(at + 16, 16)),
    "extents-overlap": ("fork:/leaf", 16, lambda w, at: w.extent(at, offset=0)),
    "dir-extent-unwritten": ("fork:/block", 0, lambda w, at: w.extent(at, flag=1)),
    "dir-block-of-another-dir": (
        "fork:/block", 0, lambda w, at: w.extent(at, fsbno=w.fsbno(w.at("fork:/leaf")))),
    "sf-inode-outside": ("fork:/few", SF + 9, be(4, 2**32 - 1)),
    "sf-inode-in-ag-headers": ("fork:/few", SF + 9, be(4, 5)),
    "sf-name-length-0": ("fork:/few", SF, b"\0"),
    "sf-name-past-end": ("fork:/few", SF, b"\xff"),
    "sf-count": ("fork:/few", 0, b"\xff"),
    "sf-i8count": ("fork:/few", 1, b"\1"),
    "sf-offsets-back": ("fork:/few", E1 + 1, be(2, 0)),
    "sf-name-with-slash": ("fork:/few", SF + 4, b"/"),
    "sf-name-twice": ("fork:/few", E1 + 3, b"a"),
    "sf-holds-itself": ("fork:/few", SF + 9, lambda w, at: be(4, w.numbers["/few"])),
    "block-magic": ("block:/block", 0, b"XDD3"),
    "block-of-another-owner": ("block:/block", 40, be(8, 128)),
    "block-at-another-place": ("block:/block", 8, be(8, 0)),
    "block-leaf-count": ("block:/block", 4096 - 8, be(4, 10**6)),
    "block-name-length": ("block:/block", E + 8, b"\xff"),
    "block-free-of-0-bytes": ("block:/block", E, be(4, 0xFFFF0000)),
    "block-free-of-12-bytes": ("block:/block", E, be(4, 0xFFFF000C)),
    "block-tag": ("block:/block", E + 46, be(2, 0)),
    "block-size-odd": ("rec:/block", 56, be(8, 4097)),
    "leaf-data-block-magic": ("block:/leaf", 0, b"XDB3"),
    "bmbt-root-level-0": ("fork:/node", 0, be(2, 0)),
    "bmbt-root-level-9": ("fork:/node", 0, be(2, 9)),
    "bmbt-root-no-keys": ("fork:/node", 2, be(2, 0)),
    "bmbt-root-keys-past-fork": ("fork:/node", 2, be(2, 100)),
    "bmbt-pointer-outside": ("fork:/node", 4 + 8 * 20, be(8, 7 << 15)),
    "bmbt-pointer-to-a-dir-block": (
        "fork:/node", 4 + 8 * 20, lambda w, at: be(8, w.fsbno(w.at("fork:/block")))),
    "bmbt-leaf-magic": ("leaf", 0, b"BMAP"),
    "bmbt-leaf-level": ("leaf", 4, be(2, 1)),
    "bmbt-leaf-owner": ("leaf", 56, be(8, 128)),
    "bmbt-leaf-at-another-place": ("leaf", 24, be(8, 8)),
    "bmbt-leaf-records-past-block": ("leaf", 6, be(2, 10000)),
    "bmbt-more-records-than-extents": ("rec:/node", 76, lambda w, at: be(4, w.u32(at) - 1)),
    "bmbt-fewer-records-than-extents": ("rec:/node", 76, lambda w, at: be(4, w.u32(at) + 1)),
    "bmbt-records-out-of-order": ("leaf", 72, lambda w, at: w.image.read(at + 16, 16)),
}  # fmt: skip


def _everything(image: Image) -> None:
    fs = image.fs()
    for _, info in walk(fs, deep=False):
        fs.data_runs(info)
        fs.metadata_ranges(info)


def _refused(image: Image, patches: dict[int, bytes], error: type[FsError] = Damaged) -> None:
    image.patches = patches
    try:
        with bounded(), pytest.raises(error):
            _everything(image)
    finally:
        image.patches = {}


@pytest.mark.parametrize("case", CASES)
def test_crafted_image_is_refused(v5: Image, case: str) -> None:
    where, offset, new = CASES[case]
    w = Where(v5)
    at = w.at(where) + offset
    patch = new if isinstance(new, bytes) else new(w, at)
    _refused(v5, {at: patch}, NotXfs if case in NOT_XFS else Damaged)
    _everything(v5)  # the clean image still reads
