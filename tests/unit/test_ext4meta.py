"""ext2/3/4 metadata read from real images made by mke2fs -d, checked against the tree
the image was made from; and the level-by-level prefetch walk over such an image."""

import os
import subprocess
from pathlib import Path

import pytest

from backupfs.plan.ext4meta import ROOT_INODE, Ext4, NotExt4
from backupfs.plan.metaprefetch import prefetch, selection

OFFSET = 1 << 20  # the filesystem starts 1 MiB into the image, as behind a partition table


def _make_tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    big = root / "big"  # several directory blocks (an htree on ext4)
    big.mkdir()
    for i in range(600):
        (big / f"file-with-a-longish-name-{i:04d}").write_bytes(b"x" * (i % 7))
    (root / "short-link").symlink_to("a/b")
    (root / "long-link").symlink_to("x" * 200)  # a target stored in a data block
    (root / "empty").mkdir()
    (root / "data.bin").write_bytes(os.urandom(100_000))


def _image(tmp_path: Path, fstype: str, *opts: str) -> tuple[Path, Path]:
    src, image = tmp_path / "src", tmp_path / f"{fstype}.img"
    _make_tree(src)
    fs = tmp_path / "fs.raw"
    cmd = ["mke2fs", "-q", "-F", "-t", fstype, *opts, "-d", str(src), str(fs), "16M"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    with open(image, "wb") as out:
        out.write(b"\0" * OFFSET)
        out.write(fs.read_bytes())
    return src, image


def _reader(image: Path):  # type: ignore[no-untyped-def]
    data = image.read_bytes()
    return lambda offset, length: data[offset : offset + length]


def _listing(fs: Ext4, number: int, prefix: str = "") -> dict[str, str]:
    """path -> kind for everything below the directory inode `number`, read via fs."""
    inode = fs.parse_inode(number, fs.read(*_span(fs.inode_range(number))))
    data = b"".join(fs.read(s, e - s) for s, e in fs.data_ranges(inode))
    out: dict[str, str] = {}
    for entry in fs.entries(inode, data):
        path = prefix + os.fsdecode(entry.name)
        if path == "lost+found":
            continue
        child = fs.parse_inode(entry.inode, fs.read(*_span(fs.inode_range(entry.inode))))
        assert entry.is_dir in (child.is_dir, None)
        if child.is_dir:
            out[path] = "dir"
            out.update(_listing(fs, entry.inode, path + "/"))
        elif child.is_symlink:
            target = child.block[: child.size] if child.inline else b"".join(
                fs.read(s, e - s) for s, e in fs.data_ranges(child))[: child.size]  # fmt: skip
            out[path] = "link:" + os.fsdecode(target)
        else:
            out[path] = f"file:{child.size}"
    return out


def _span(r: tuple[int, int]) -> tuple[int, int]:
    return r[0], r[1] - r[0]


def _source_listing(src: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, src)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                out[rel] = f"file:{os.path.getsize(path)}"
    return out


CASES = {
    "ext4": ("ext4",),
    "ext4-1k-blocks": ("ext4", "-b", "1024"),
    "ext4-no-64bit-no-csum": ("ext4", "-O", "^64bit,^metadata_csum"),
    "ext3": ("ext3",),
    "ext2": ("ext2",),
}


@pytest.mark.parametrize("case", CASES)
def test_the_tree_read_from_the_image_is_the_source_tree(tmp_path: Path, case: str) -> None:
    fstype, *opts = CASES[case]
    src, image = _image(tmp_path, fstype, *opts)
    fs = Ext4(_reader(image), OFFSET)
    assert _listing(fs, ROOT_INODE) == _source_listing(src)


def test_the_data_ranges_of_a_file_hold_its_bytes(tmp_path: Path) -> None:
    src, image = _image(tmp_path, "ext4")
    fs = Ext4(_reader(image), OFFSET)
    root = fs.parse_inode(ROOT_INODE, fs.read(*_span(fs.inode_range(ROOT_INODE))))
    data = b"".join(fs.read(s, e - s) for s, e in fs.data_ranges(root))
    (entry,) = [e for e in fs.entries(root, data) if e.name == b"data.bin"]
    inode = fs.parse_inode(entry.inode, fs.read(*_span(fs.inode_range(entry.inode))))
    content = b"".join(fs.read(s, e - s) for s, e in fs.data_ranges(inode))[: inode.size]
    assert content == (src / "data.bin").read_bytes()


def test_anything_else_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "zeros.img"
    image.write_bytes(b"\0" * (4 << 20))
    with pytest.raises(NotExt4):
        Ext4(_reader(image), OFFSET)


def test_prefetch_walks_the_whole_tree_or_only_the_selected_paths(tmp_path: Path) -> None:
    src, image = _image(tmp_path, "ext4")
    everything = len(_source_listing(src)) + 1 + 1  # + the root + lost+found
    walked = prefetch(str(image), OFFSET, [(ROOT_INODE, None)])
    assert walked.errors == []
    assert walked.inodes == everything
    assert walked.directories == 7  # root, a, a/b, a/b/c, big, empty, lost+found
    assert walked.rounds == 5  # root, a, b, c, deep.txt: one round per level

    some = prefetch(str(image), OFFSET, [(ROOT_INODE, selection(["a/b/c/deep.txt", "big/"]))])
    assert some.errors == []
    assert some.inodes == 1 + 3 + 1 + 1 + 600  # root, a, b, c, deep.txt, big and its files
    assert some.rounds == 5

    asked = iter([False, False, True])  # as the fill does once a restore begins
    stopped = prefetch(str(image), OFFSET, [(ROOT_INODE, None)], lambda: next(asked))
    assert stopped.rounds == 2 and stopped.inodes < everything


def test_prefetch_of_something_else_reports_and_reads_little(tmp_path: Path) -> None:
    image = tmp_path / "zeros.img"
    image.write_bytes(b"\0" * (4 << 20))
    walked = prefetch(str(image), OFFSET, [(ROOT_INODE, None)])
    assert walked.inodes == 0 and walked.errors == ["no ext2/3/4 superblock"]


def test_a_directory_loop_in_a_damaged_filesystem_ends_the_walk(tmp_path: Path) -> None:
    src, image = _image(tmp_path, "ext4")
    fs_raw = tmp_path / "fs.raw"  # debugfs edits the bare filesystem; then re-wrap it
    subprocess.run(["debugfs", "-w", "-R", "ln /a /a/b/c/back", str(fs_raw)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    with open(image, "r+b") as out:
        out.seek(OFFSET)
        out.write(fs_raw.read_bytes())
    walked = prefetch(str(image), OFFSET, [(ROOT_INODE, None)])
    assert walked.errors == []
    assert walked.directories == 7  # a, b, c once each, however often they are named


def test_prefetch_of_an_image_that_cannot_be_opened_reports(tmp_path: Path) -> None:
    walked = prefetch(str(tmp_path / "missing.img"), OFFSET, [(ROOT_INODE, None)])
    assert walked.inodes == 0 and len(walked.errors) == 1 and "No such file" in walked.errors[0]
