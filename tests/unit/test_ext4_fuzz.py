"""Random damage to a real ext4 image (made by mke2fs -d): bytes of its superblock, group
descriptors, inodes and directory blocks changed, often at the fields that size or
locate things. The reader either reads it or raises NotExt4; the metadata walk over the
damaged image file either walks it or reports why it stopped; both within two seconds
and without a large allocation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupfs.plan.ext4meta import ROOT_INODE, Ext4, NotExt4
from backupfs.plan.metaprefetch import prefetch
from tests.unit.test_ext4_hostile import Image, bounded, make_fs, small_tree

# Where the superblock, a group descriptor, an inode and a directory entry keep their
# counts, sizes, block numbers and flags (offsets within each).
SUPERBLOCK_FIELDS = (0, 4, 20, 24, 28, 32, 40, 56, 76, 88, 96, 100, 254, 0x150)
DESCRIPTOR_FIELDS = (0, 4, 8, 0x20, 0x24, 0x28)
INODE_FIELDS = (0, 4, 32, 40, 42, 44, 46, 52, 56, 58, 60, 64, 68, 88, 96, 104, 108, 118)
DIRENT_FIELDS = (0, 4, 6, 7, 12, 16, 18, 19, 24, 28)
VALUES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x10000,
          0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 0xF30A)  # fmt: skip
SECONDS = 2.0
PEAK_BYTES = 32 << 20  # the image is 8 MiB


@dataclass(frozen=True)
class Region:
    start: int
    length: int
    fields: tuple[int, ...]


class Target:
    """The image file, its undamaged bytes and where its metadata lies."""

    def __init__(self, path: Path, pristine: bytes, regions: list[Region]) -> None:
        self.path, self.pristine, self.regions = path, pristine, regions

    def __repr__(self) -> str:  # hypothesis prints it with a failing example
        return f"Target({str(self.path)!r})"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    """An 8 MiB ext4 (1 KiB blocks, so big/ spans several blocks), and where its
    metadata lies, found by the reader before any damage."""
    work = tmp_path_factory.mktemp("fuzz")
    image = Image(make_fs(work / "ext4.img", small_tree, "-t", "ext4", size="8M"))
    fs = image.fs
    regions = [Region(1024, 1024, SUPERBLOCK_FIELDS)]
    regions.append(Region((1024 // fs.block_size + 1) * fs.block_size, 64, DESCRIPTOR_FIELDS))
    numbers = [ROOT_INODE, 11, image.lookup("a"), image.lookup("big"), image.lookup("pad.bin"),
               image.lookup("a", "inner.txt"), image.lookup("Za%b")]  # fmt: skip
    regions += [Region(fs.inode_range(n)[0], fs.inode_size, INODE_FIELDS) for n in numbers]
    for number in numbers[:4]:  # the directories
        for block in image.blocks_of(number):
            regions.append(Region(block * fs.block_size, fs.block_size, DIRENT_FIELDS))
    return Target(image.path, image.path.read_bytes(), regions)


# (region, a named field or anywhere, where, width in bytes, value)
damage = st.lists(
    st.tuples(
        st.integers(0, 1 << 16),
        st.booleans(),
        st.integers(0, 1 << 16),
        st.sampled_from([1, 2, 4]),
        st.one_of(st.sampled_from(VALUES), st.integers(0, 0xFFFFFFFF)),
    ),
    min_size=1,
    max_size=8,
)


def _damage(target: Target, changes: list[tuple[int, bool, int, int, int]]) -> dict[int, bytes]:
    """The damage as {offset: new bytes}."""
    out = {}
    for which, named, where, width, value in changes:
        region = target.regions[which % len(target.regions)]
        at = region.fields[where % len(region.fields)] if named else where % region.length
        at = min(at, region.length - width)
        out[region.start + at] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
    return out


def _read_everything(data: bytes) -> None:
    """Every inode, directory and long symlink the reader finds from the root, with a
    budget of our own (a damaged tree may name the same blocks over and over)."""

    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    fs = Ext4(read, 0, len(data))
    todo, seen, budget = [ROOT_INODE], set(), 4 * len(data)
    while todo and len(seen) < 4096 and budget > 0:
        number = todo.pop()
        if number in seen:
            continue
        seen.add(number)
        start, end = fs.inode_range(number)
        inode = fs.parse_inode(number, read(start, end - start))
        fs.inode_extents(inode)
        if inode.is_dir or inode.is_symlink:
            ranges = fs.data_ranges(inode)
            budget -= sum(end - start for start, end in ranges)
            if inode.is_dir:
                blocks = b"".join(read(start, end - start) for start, end in ranges)
                todo += [entry.inode for entry in fs.entries(inode, blocks)]


@contextlib.contextmanager
def _damaged(target: Target, changes: dict[int, bytes]) -> Iterator[bytes]:
    """The image file with the damage written into it (undone afterwards), and its bytes."""
    data = bytearray(target.pristine)
    for at, new in changes.items():
        data[at : at + len(new)] = new
    with open(target.path, "r+b") as f:
        for at, new in changes.items():
            os.pwrite(f.fileno(), new, at)
        try:
            yield bytes(data)
        finally:
            for at, new in changes.items():
                os.pwrite(f.fileno(), target.pristine[at : at + len(new)], at)


@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(changes=damage)
def test_damaged_metadata_is_read_or_refused(
    target: Target, changes: list[tuple[int, bool, int, int, int]]
) -> None:
    with _damaged(target, _damage(target, changes)) as data:
        with bounded(SECONDS, PEAK_BYTES), contextlib.suppress(NotExt4):
            _read_everything(data)
        with bounded(SECONDS, PEAK_BYTES):
            walked = prefetch(str(target.path), 0, [(ROOT_INODE, None)])
    assert len(walked.errors) <= 1
    assert all(b"/" not in name and b"\0" not in name and name not in (b"", b".", b"..")
               for f in walked.files.values() for name in f.rel.split(b"/"))  # fmt: skip


def test_the_undamaged_image_is_read_whole(target: Target) -> None:
    """The fuzz starts from an image both read completely."""
    with _damaged(target, {}) as data:
        _read_everything(data)
        walked = prefetch(str(target.path), 0, [(ROOT_INODE, None)])
    assert walked.errors == [] and len(walked.files) == 2 + 100 + 5
