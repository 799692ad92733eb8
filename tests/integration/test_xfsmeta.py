"""The userspace XFS reader on images the kernel filled through a loop mount: every path's
type, mode, size, mtime, owner, link count, inode number, symlink target and bytes
(reassembled from data runs by reading the image file) must equal what a read-only
mount of the same image shows. The tree holds every directory format, fragmented,
sparse, preallocated and punched files, bmap B+tree data forks of one and two levels,
inline and remote symlinks; a directory's ranges and a file's runs must equal the blocks
xfs_db maps for it. Then the same images crafted, refused quickly. Helpers are shared
with tests/unit/test_xfsmeta.py."""

import concurrent.futures
import contextlib
import hashlib
import os
import random
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupfs.plan.fsmeta import FileInfo, FsError
from backupfs.plan.xfsmeta import Damaged, NotXfs, Xfs
from tests.support.fsimages import run_tool
from tests.support.kernel import needs_filesystems
from tests.support.system import unmount
from tests.support.trees import make_tree
from tests.unit.test_xfsmeta import OFFSET, SIZE, Image, be, bounded, content, walk

# The images are filled through a loop mount of the kernel's xfs driver.
pytestmark = [
    needs_filesystems("xfs"),
    pytest.mark.skipif(os.geteuid() != 0, reason="loop-mounting needs root"),
]

GEOMETRIES = {  # mkfs.xfs options
    "v5": "",
    "v5-1k-blocks-8k-dir-blocks-no-bigtime": "-b size=1024 -n size=8192 -m bigtime=0",
    "v5-64k-blocks-1k-inodes-nrext64": "-b size=65536 -i size=1024,nrext64=1",
}


@contextlib.contextmanager
def mounted(image: Path, *, ro: bool) -> Iterator[Path]:
    """`image` mounted through a loop device of its own; both undone afterwards. Written
    with little speculative preallocation, so files written in turns are fragmented."""
    mnt = image.parent / ("ro" if ro else "rw")
    mnt.mkdir(exist_ok=True)
    loop = run_tool(["losetup", "-f", "--show", *(["-r"] if ro else []), str(image)]).strip()
    try:
        run_tool(["mount", "-t", "xfs", "-o", "ro" if ro else "allocsize=64k", loop, str(mnt)])
        try:
            yield mnt
        finally:
            unmount(mnt, attempts=5)
    finally:
        run_tool(["losetup", "-d", loop])
        mnt.rmdir()


def _write_pieces(path: Path, pieces: list[tuple[int, bytes]], size: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for at, data in pieces:
            os.pwrite(fd, data, at)
        if size is not None:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def fill(mnt: Path, src: Path, bs: int) -> None:
    """Everything the reader must read, written through the kernel."""
    rng = random.Random(3)
    run_tool(["cp", "-a", "--", f"{src}/.", f"{mnt}/"])
    for name, count in (("few", 3), ("block", 40), ("leaf", 300), ("node", 5000)):
        (mnt / name).mkdir()
        for i in range(count):
            data = b"y" * (i % 5) if i < 400 else b""  # (blocks of 64 KiB fill up)
            (mnt / name / f"entry-{i:05d}-with-a-longer-name").write_bytes(data)
    for i in range(0, 5000, 7):  # free space and stale hash entries in a node directory
        (mnt / "node" / f"entry-{i:05d}-with-a-longer-name").unlink()
    os.setxattr(mnt / "node", "user.note", b"an attribute fork beside the data fork")
    # bmap B+trees: every other block written (two levels with 4 KiB blocks and below)
    holes = min(6000, (48 << 20) // (2 * bs))
    _write_pieces(mnt / "holes.bin", [(2 * i * bs, rng.randbytes(bs)) for i in range(holes)])
    os.setxattr(mnt / "holes.bin", "user.big", rng.randbytes(200))  # a smaller data fork
    fds = [os.open(mnt / f"inter-{c}", os.O_WRONLY | os.O_CREAT, 0o600) for c in "ab"]
    for i in range(64):  # two files written in turns, each piece on disk before the next
        for fd in fds:
            os.pwrite(fd, rng.randbytes(16384), i * 16384)
            os.fsync(fd)
    for fd in fds:
        os.close(fd)
    run_tool(["xfs_io", "-f", "-c", "falloc 0 1m", "-c", "pwrite -S 0x61 256k 64k",
              "-c", "fsync", str(mnt / "prealloc.bin")])  # fmt: skip
    _write_pieces(mnt / "punched.bin", [(0, rng.randbytes(1 << 20))])
    run_tool(["xfs_io", "-c", "fpunch 64k 128k", "-c", "fpunch 640k 64k", str(mnt / "punched.bin")])
    _write_pieces(mnt / "sparse.bin", [(100 << 20, b"end")], size=(100 << 20) + 3 + 5000)
    (mnt / "empty.bin").write_bytes(b"")
    (mnt / "short-link").symlink_to("few/entry-00000-with-a-longer-name")
    (mnt / "inline-link").symlink_to("i" * 300)
    (mnt / "remote-link").symlink_to("r" * 1000)
    (mnt / "longest-link").symlink_to(("z" * 200 + "/") * 5 + "z" * 18)  # 1023 bytes: the most
    os.link(mnt / "few" / "entry-00001-with-a-longer-name", mnt / "hard-link")
    odd = mnt / "odd"
    odd.mkdir(mode=0o755)
    for raw in (b"caf\xe9", b"new\nline", b"sp ace", b"n" * 255):
        (odd / os.fsdecode(raw)).write_bytes(raw)
    os.mkfifo(odd / "fifo")
    os.mknod(odd / "null", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(odd, 0o1777)
    os.chmod(odd / "sp ace", 0o4755)
    os.chown(odd / "caf\udce9", 1234, 5678)
    os.utime(odd / "sp ace", ns=(0, -123_456_789_012))  # before 1970
    os.utime(odd / "new\nline", ns=(0, (1 << 33) * 10**9 + 5))  # past 2038 (bigtime)


@dataclass(frozen=True)
class Truth:
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    nlink: int
    ino: int
    target: str | None
    sha256: str | None


def truth(mnt: Path) -> dict[str, Truth]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            sha = (
                hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            )
            out["/" + str(path.relative_to(mnt))] = Truth(
                st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid, st.st_gid, st.st_nlink,
                st.st_ino, target, sha)  # fmt: skip
    return out


@dataclass
class Made:
    image: Image
    truth: dict[str, Truth]
    root_ino: int


@pytest.fixture(scope="module", params=list(GEOMETRIES.values()), ids=list(GEOMETRIES))
def made(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Made]:
    base = tmp_path_factory.mktemp("xfs")
    src, path = base / "src", base / "xfs.img"
    make_tree(src, seed=4, files=40)
    with open(path, "wb") as f:
        f.truncate(SIZE)
    run_tool(["mkfs.xfs", "-q", "-f", *request.param.split(), str(path)])
    bs = int(re.findall(r"blocksize = (\d+)", _xfs_db(path, "sb", "p blocksize"))[0])
    with mounted(path, ro=False) as mnt:
        fill(mnt, src, bs)
    with mounted(path, ro=True) as mnt:
        seen, root_ino = truth(mnt), mnt.stat().st_ino
    image = Image(path)
    yield Made(image, seen, root_ino)
    image.close()


def _xfs_db(image: Path, *commands: str) -> str:
    return run_tool(["xfs_db", "-r", *(a for c in commands for a in ("-c", c)), str(image)])


def _as_truth(fs: Xfs, image: Image, info: FileInfo) -> Truth:
    data = content(fs, image.read, info) if info.is_file or info.is_symlink else None
    return Truth(
        info.mode, info.size, info.mtime_ns, info.uid, info.gid, info.nlink, info.number,
        os.fsdecode(data) if info.is_symlink and data is not None else None,
        hashlib.sha256(data).hexdigest() if info.is_file and data is not None else None,
    )  # fmt: skip


def test_every_path_reads_as_the_kernel_shows_it(made: Made) -> None:
    fs = made.image.fs()
    assert fs.root == made.root_ino
    got = {path: _as_truth(fs, made.image, info) for path, info in walk(fs)}
    assert got.keys() == made.truth.keys()
    for path, want in made.truth.items():
        if stat.S_ISDIR(want.mode):  # a directory's size is XFS's own; the rest must agree
            want = Truth(**{**want.__dict__, "size": got[path].size})
        assert got[path] == want, path


def test_walks_in_many_threads_agree(made: Made) -> None:
    fs = made.image.fs()
    alone = dict(walk(fs))
    fresh = made.image.fs()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        numbers = [info.number for info in alone.values()]
        infos = list(pool.map(fresh.inode, numbers))
        listings = list(pool.map(fresh.entries, [i for i in infos if i.is_dir]))
        runs = list(pool.map(fresh.data_runs, infos))
    assert infos == list(alone.values())
    assert listings == [fs.entries(i) for i in alone.values() if i.is_dir]
    assert runs == [fs.data_runs(i) for i in alone.values()]


def _bmap(image: Image, fs: Xfs, number: int) -> list[tuple[int, int, int, bool]]:
    """(file offset, image offset, bytes, unwritten) of each extent, as xfs_db maps it."""
    out = []
    bmap = _xfs_db(image.path, f"inode {number}", "bmap")
    for off, agno, agbno, count, flag in re.findall(
        r"data offset (\d+) startblock \d+ \((\d+)/(\d+)\) count (\d+) flag (\d)", bmap
    ):
        at = OFFSET + (int(agno) * fs.agblocks + int(agbno)) * fs.block_size
        out.append((int(off) * fs.block_size, at, int(count) * fs.block_size, flag == "1"))
    return out


def _core(image: Image, number: int, *fields: str) -> list[int]:
    out = _xfs_db(image.path, f"inode {number}", "p " + " ".join(f"core.{f}" for f in fields))
    return [int(v) for v in re.findall(r"= (\d+)", out)]


def test_formats_ranges_and_runs_match_xfs_db(made: Made) -> None:
    """Every format is there, a directory's ranges are the blocks xfs_db maps for it
    (data, leaf, free index) and then its bmap B+tree blocks, and a file's runs are its
    written extents cut at its size."""
    fs, image = made.image.fs(), made.image
    infos = dict(walk(fs))
    formats = {}
    names = "/few /block /leaf /node /holes.bin /inter-a /prealloc.bin /punched.bin"
    for name in (names + " /sparse.bin /remote-link /longest-link /inline-link").split():
        info = infos[name]
        fmt, nblocks = _core(image, info.number, "format", "nblocks")
        formats[name] = fmt
        extents = _bmap(image, fs, info.number)
        if info.is_dir:
            ranges = fs.metadata_ranges(info)
            if fmt == 1:
                assert ranges == [info.record]
                continue
            mapped = [(at, at + n) for _, at, n, _ in extents]
            assert ranges[: len(mapped)] == mapped
            tree = ranges[len(mapped) :]
            assert len(tree) == nblocks - sum(n for *_, n, _ in extents) // fs.block_size
        elif info.is_file:
            written = [(o, at, min(n, info.size - o)) for o, at, n, u in extents
                       if not u and o < info.size]  # fmt: skip
            assert [
                (r.file_offset, r.image_offset, r.length) for r in fs.data_runs(info)
            ] == written
    assert formats["/few"] == 1 and formats["/inline-link"] == 1
    assert formats["/block"] == formats["/leaf"] == 2  # (one block; some and a leaf block)
    assert formats["/node"] == (2 if fs.block_size == 65536 else 3)  # a B+tree below 64 KiB
    assert infos["/block"].size == fs.block_size * fs.dir_fsbs  # one directory block
    assert formats["/holes.bin"] == 3 and formats["/remote-link"] == 2
    assert any(u for *_, u in _bmap(image, fs, infos["/prealloc.bin"].number))
    assert len(_bmap(image, fs, infos["/inter-a"].number)) > 4  # fragmented
    if fs.block_size == 4096:  # 6000 extents: a root in the inode over nodes over leaves
        root_level = int(_xfs_db(image.path, f"inode {infos['/holes.bin'].number}",
                                 "p u3.bmbt.level").split("=")[1])  # fmt: skip
        assert root_level == 2


# -- the same images crafted: refused quickly, in little memory; or, rearranged, read


def _read(fs: Xfs, path: str) -> None:
    """Everything the reader says of `path`: its inode, runs, ranges and entries (and
    the inodes of the first 20 of them)."""
    info = lookup(fs, path)
    fs.data_runs(info)
    fs.metadata_ranges(info)
    if info.is_dir:
        for _, number in fs.entries(info)[:20]:
            fs.inode(number)


def _refused(made: Made, patches: dict[int, bytes], path: str) -> None:
    """With `patches`, reading `path` raises Damaged."""
    made.image.patches = patches
    try:
        with bounded(), pytest.raises(Damaged):
            _read(made.image.fs(), path)
    finally:
        made.image.patches = {}


def lookup(fs: Xfs, path: str) -> FileInfo:
    info = fs.inode(fs.root)
    for name in [n for n in path.split("/") if n]:
        info = fs.inode(dict(fs.entries(info))[name])
    return info


def _root_ptrs(fs: Xfs, number: int) -> tuple[int, int]:
    """Where the first pointer of an inode's bmap B+tree root lies, and the value."""
    d = fs.dinode(number)
    at = d.fork_at + 4 + 8 * ((len(d.fork) - 4) // 16)
    return at, int.from_bytes(d.fork[at - d.fork_at : at - d.fork_at + 8], "big")


def test_crafted_bmap_btree_is_refused(made: Made) -> None:
    """A file's and a directory's bmap B+tree: blocks pointing to themselves, two keys
    to one child, a child of another inode, levels out of place, keys past the extents."""
    fs = made.image.fs()
    infos = dict(walk(fs))
    node_max = (fs.block_size - 72) // 16
    for path in ("/holes.bin", "/node") if fs.block_size < 65536 else ("/holes.bin",):
        d = fs.dinode(infos[path].number)
        keys = d.fork_at + 4  # the root's first key, then its first pointer
        at, child = _root_ptrs(fs, d.info.number)
        node = fs.at(fs.fsblock(child, 1, ""))
        level = int.from_bytes(made.image.read(node + 4, 2), "big")
        ptrs = node + 72 + 8 * node_max
        if level:  # a node pointing to itself, and to one child twice
            _refused(made, {ptrs: be(8, child)}, path)
            _refused(made, {ptrs + 8: made.image.read(ptrs, 8)}, path)
        else:  # the root made one level deeper: its leaf as a node pointing to itself
            itself = {node + 4: be(2, 1) + be(2, 1), node + 72: be(8, 0), ptrs: be(8, child)}
            _refused(made, {d.fork_at: be(2, 2)} | itself, path)
        _refused(made, {at: be(8, _root_ptrs(fs, infos["/inter-a"].number)[1])}, path)
        _refused(made, {node + 4: be(2, level + 1)}, path)  # a level out of place
        _refused(made, {keys: be(8, 1 << 40)}, path)  # a key past its extents


def test_crafted_remote_symlink_is_refused(made: Made) -> None:
    fs = made.image.fs()
    infos = dict(walk(fs))
    (run,) = fs.data_runs(infos["/remote-link"])
    head = run.image_offset - 56
    for offset, new in ((0, b"XSLN"), (4, be(4, 1)), (8, be(4, 0)), (8, be(4, 1001)),
                        (8, be(4, 999)), (32, be(8, 128)), (40, be(8, 0))):  # fmt: skip
        _refused(made, {head + offset: new}, "/remote-link")
    at = infos["/remote-link"].record[0]  # 4 extents (di_nextents, or nrext64's)
    _refused(made, {at + 76: be(4, 4), at + 24: be(8, 4)}, "/remote-link")


def test_directory_block_in_pieces_reads_and_with_a_hole_is_refused(made: Made) -> None:
    """A directory block of 8 filesystem blocks may lie in two extents (the kernel takes
    what it gets): moved apart it reads the same; with half of it missing, Damaged."""
    fs = made.image.fs()
    if fs.dir_fsbs == 1:
        pytest.skip("directory blocks of one filesystem block")
    block = dict(walk(fs))["/block"]
    d, half = fs.dinode(block.number), fs.dir_fsbs // 2
    (extent,), _ = fs.extents(d)
    elsewhere = fs.dblocks - fs.dir_fsbs  # near the end of the last AG: not used
    agno, agbno = divmod(elsewhere, fs.agblocks)
    moved = fs.read_blocks(extent.block + half, half)

    def record(offset: int, fsbno: int, count: int) -> bytes:
        return struct.pack(">QQ", offset << 9 | fsbno >> 43, (fsbno & (1 << 43) - 1) << 21 | count)

    first = record(0, _fsbno_of(fs, extent.block), half)
    second = record(half, agno << fs.agblklog | agbno, half)
    split = {block.record[0] + 76: be(4, 2), d.fork_at: first + second, fs.at(elsewhere): moved}
    made.image.patches = split
    try:
        assert made.image.fs().entries(block) == fs.entries(block)
    finally:
        made.image.patches = {}
    _refused(made, {**split, block.record[0] + 76: be(4, 1)}, "/block")
    _refused(made, {**split, d.fork_at + 16: record(half + 1, agno << fs.agblklog | agbno, half)},
             "/block")  # fmt: skip


def _fsbno_of(fs: Xfs, linear: int) -> int:
    agno, agbno = divmod(linear, fs.agblocks)
    return agno << fs.agblklog | agbno


def test_not_xfs_short_reads_and_a_small_device(made: Made, tmp_path: Path) -> None:
    ext4 = tmp_path / "ext4.img"
    run_tool(["mke2fs", "-q", "-F", str(ext4), "8M"])
    data = ext4.read_bytes()
    with pytest.raises(NotXfs) as raised:
        Xfs(lambda at, n: data[at : at + n], 0)
    assert type(raised.value) is NotXfs
    with pytest.raises(NotXfs):
        Xfs(lambda at, n: b"", 0)
    with pytest.raises(Damaged, match="more than the device"):
        Xfs(made.image.read, OFFSET, SIZE - 4096)
    cut = OFFSET + (SIZE >> 3)  # the image ends early: in the first AG
    fs = Xfs(lambda at, n: made.image.read(at, n)[: max(0, cut - at)], OFFSET)
    with bounded(), pytest.raises(Damaged, match="short read"):
        for _, info in walk(fs, deep=False):
            fs.data_runs(info)


def test_random_damage_is_refused_or_read(made: Made) -> None:
    """Random bytes of the superblock, inodes, directory, bmap B+tree and symlink blocks
    changed: each read ends within a second with an answer or FsError, nothing else."""
    fs, rng = made.image.fs(), random.Random(11)
    spots = [("/few", OFFSET, 264)]
    for path in ("/", "/few", "/block", "/leaf", "/node", "/holes.bin", "/remote-link", "/odd"):
        info = lookup(fs, path) if path != "/" else fs.inode(fs.root)
        spots.append((path, info.record[0], fs.inode_size))
        extents, tree = fs.extents(fs.dinode(info.number))
        chunks = [(fs.at(e.block), min(e.count * fs.block_size, 1 << 16)) for e in extents[:4]]
        spots += [(path, at, n) for at, n in chunks + [(s, e - s) for s, e in tree[:4]]]
    refused = 0
    try:
        for _ in range(200):
            path, at, length = rng.choice(spots)
            changes = rng.randint(1, 3)
            made.image.patches = {at + rng.randrange(length): bytes([rng.randrange(256)])
                                  for _ in range(changes)}  # fmt: skip
            try:
                with bounded(peak_bytes=None):
                    _read(made.image.fs(), path)
            except FsError:
                refused += 1
    finally:
        made.image.patches = {}
    assert refused > 30
