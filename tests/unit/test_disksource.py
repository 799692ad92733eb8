"""backupfs.readpath.disksource.DiskCachedSource over a real DiskCache in tmp_path and a
fake inner source that records what it was asked for."""

import hashlib
import os
from pathlib import Path

import pytest
import trio

from backupfs.errors import FetchError
from backupfs.readpath.blocks import BlockReader, ReaderConfig
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.diskcache import DiskCache
from backupfs.readpath.disksource import DiskCachedSource
from backupfs.readpath.readahead import ReadaheadConfig, StreamTracker
from backupfs.remote.digests import LoadedDigests
from backupfs.stats import Stats
from backupfs.store.image import Image

DBS = 1024  # digest block size
BS = 4 * DBS  # cache block size


class FakeInner:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []
        self.fail = False

    async def fetch_range(
        self, image: Image, start: int, end: int, block_size: int, urgent: bool = False
    ) -> list[bytes]:
        self.calls.append((start, end))
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise FetchError("inner failed", transient=True)
        body = self.data[start:end]
        return [body[i : i + block_size] for i in range(0, len(body), block_size)]


def make_image(data: bytes, block_size: int = BS, digests: bool = True) -> Image:
    pieces = [data[i : i + DBS] for i in range(0, len(data), DBS)]
    return Image(
        image_id=1,
        url="http://store.invalid/h/s/disk.img",
        size_bytes=len(data),
        block_size=block_size,
        digest_block_size=DBS,
        digests=LoadedDigests(b"".join(hashlib.sha256(p).digest() for p in pieces))
        if digests
        else None,
    )


def digest_list(image: Image) -> list[bytes]:
    assert isinstance(image.digests, LoadedDigests)
    data = image.digests.data
    return [data[i : i + 32] for i in range(0, len(data), 32)]


def entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / "v1").rglob("*") if p.is_file())


def entry(root: Path, digest: bytes) -> Path:
    return root / "v1" / digest.hex()[:2] / digest.hex()


def blocks_of(data: bytes, start: int, end: int, block_size: int = BS) -> list[bytes]:
    return [data[i : min(i + block_size, end)] for i in range(start, end, block_size)]


async def fetch(
    inner: FakeInner, disk: DiskCache, image: Image, start: int, end: int, stats: Stats
) -> list[bytes]:
    """One fetch through a DiskCachedSource; returns once its disk writes are done too."""
    async with trio.open_nursery() as writes:
        source = DiskCachedSource(inner, disk, writes, stats)
        blocks = await source.fetch_range(image, start, end, image.block_size)
    return blocks


async def test_misses_are_fetched_and_written_to_disk(tmp_path: Path) -> None:
    data = os.urandom(8 * BS)
    inner, stats = FakeInner(data), Stats()
    disk = DiskCache(tmp_path, 1 << 30)
    image = make_image(data)
    assert await fetch(inner, disk, image, 0, 4 * BS, stats) == blocks_of(data, 0, 4 * BS)
    assert inner.calls == [(0, 4 * BS)]
    assert stats.disk_cache_hits == 0
    assert image.digests is not None
    assert entries(tmp_path) == sorted(entry(tmp_path, d) for d in digest_list(image)[:16])
    for i, digest in enumerate(digest_list(image)[:16]):
        assert entry(tmp_path, digest).read_bytes() == data[i * DBS : (i + 1) * DBS]


async def test_disk_hits_are_not_fetched(tmp_path: Path) -> None:
    data = os.urandom(8 * BS)
    inner, image = FakeInner(data), make_image(data)
    await fetch(inner, DiskCache(tmp_path, 1 << 30), image, 0, 8 * BS, Stats())
    inner.calls.clear()
    stats = Stats()
    remounted = DiskCache(tmp_path, 1 << 30)  # a later mount sharing the directory
    assert await fetch(inner, remounted, image, 2 * BS, 6 * BS, stats) == blocks_of(
        data, 2 * BS, 6 * BS
    )
    assert inner.calls == []
    assert stats.disk_cache_hits == 4
    assert remounted.stats.hits == 16  # every digest block was read (and hashed) from disk


async def test_only_the_missing_runs_are_fetched(tmp_path: Path) -> None:
    data = os.urandom(7 * BS)
    inner, stats = FakeInner(data), Stats()
    disk = DiskCache(tmp_path, 1 << 30)
    image = make_image(data)
    assert image.digests is not None
    for n in (2, 4):  # blocks 2 and 4 are on disk already
        for j in range(4):
            disk.put(digest_list(image)[n * 4 + j], data[n * BS + j * DBS : n * BS + (j + 1) * DBS])
    assert await fetch(inner, disk, image, 0, 7 * BS, stats) == blocks_of(data, 0, 7 * BS)
    assert inner.calls == [(0, 2 * BS), (3 * BS, 4 * BS), (5 * BS, 7 * BS)]
    assert stats.disk_cache_hits == 2
    assert len(entries(tmp_path)) == 28  # the fresh blocks were written as well


async def test_a_block_with_one_piece_missing_is_fetched_whole(tmp_path: Path) -> None:
    data = os.urandom(2 * BS)
    inner, image = FakeInner(data), make_image(data)
    disk = DiskCache(tmp_path, 1 << 30)
    await fetch(inner, disk, image, 0, 2 * BS, Stats())
    assert image.digests is not None
    entry(tmp_path, digest_list(image)[6]).unlink()  # the third piece of block 1
    inner.calls.clear()
    stats = Stats()
    assert await fetch(inner, disk, image, 0, 2 * BS, stats) == blocks_of(data, 0, 2 * BS)
    assert inner.calls == [(BS, 2 * BS)]
    assert stats.disk_cache_hits == 1
    assert entry(tmp_path, digest_list(image)[6]).read_bytes() == data[6 * DBS : 7 * DBS]


async def test_a_corrupted_entry_is_fetched_again_and_rewritten(tmp_path: Path) -> None:
    data = os.urandom(3 * BS)
    inner, image = FakeInner(data), make_image(data)
    disk = DiskCache(tmp_path, 1 << 30)
    await fetch(inner, disk, image, 0, 3 * BS, Stats())
    assert image.digests is not None
    damaged = entry(tmp_path, digest_list(image)[5])  # in block 1
    damaged.write_bytes(b"\0" * DBS)
    inner.calls.clear()
    stats = Stats()
    assert await fetch(inner, disk, image, 0, 3 * BS, stats) == blocks_of(data, 0, 3 * BS)
    assert inner.calls == [(BS, 2 * BS)]
    assert stats.disk_cache_hits == 2
    assert disk.stats.corrupt == 1
    assert damaged.read_bytes() == data[5 * DBS : 6 * DBS]


async def test_the_short_last_block_round_trips(tmp_path: Path) -> None:
    data = os.urandom(2 * BS + 1500)  # block 2 is one full piece and 476 bytes
    inner, image = FakeInner(data), make_image(data)
    disk = DiskCache(tmp_path, 1 << 30)
    assert await fetch(inner, disk, image, BS, len(data), Stats()) == blocks_of(data, BS, len(data))
    inner.calls.clear()
    stats = Stats()
    assert await fetch(inner, disk, image, 2 * BS, len(data), stats) == [data[2 * BS :]]
    assert inner.calls == []
    assert stats.disk_cache_hits == 1


async def test_an_image_without_digests_goes_straight_to_the_inner_source(
    tmp_path: Path,
) -> None:
    data = os.urandom(4 * BS)
    inner, image = FakeInner(data), make_image(data, digests=False)
    disk = DiskCache(tmp_path, 1 << 30)
    for _ in range(2):
        assert await fetch(inner, disk, image, 0, 4 * BS, Stats()) == blocks_of(data, 0, 4 * BS)
    assert inner.calls == [(0, 4 * BS)] * 2
    assert entries(tmp_path) == []


async def test_a_failed_fetch_raises_and_writes_nothing(tmp_path: Path) -> None:
    data = os.urandom(4 * BS)
    inner, image = FakeInner(data), make_image(data)
    inner.fail = True
    disk = DiskCache(tmp_path, 1 << 30)
    async with trio.open_nursery() as writes:
        source = DiskCachedSource(inner, disk, writes, Stats())
        with pytest.raises(FetchError, match="inner failed"):
            await source.fetch_range(image, 0, 4 * BS, BS)
    assert entries(tmp_path) == []


async def test_a_block_reader_over_the_disk_source_reads_a_remount_from_disk(
    tmp_path: Path,
) -> None:
    data = os.urandom(16 * BS)
    image = make_image(data)
    for mount in range(2):
        inner, stats = FakeInner(data), Stats()
        async with trio.open_nursery() as daemon:
            source = DiskCachedSource(inner, DiskCache(tmp_path, 1 << 30), daemon, stats)
            reader = BlockReader(
                source, BlockCache(1 << 20, stats), daemon, ReaderConfig(request_size=8 * BS), stats
            )
            tracker = StreamTracker(ReadaheadConfig())
            assert await reader.read(image, 100, 10 * BS, tracker) == data[100 : 100 + 10 * BS]
        if mount == 0:  # the fetches of the read, cut at request_size
            assert sorted(inner.calls) == [(0, 8 * BS), (8 * BS, 11 * BS)]
            assert stats.disk_cache_hits == 0
        else:
            assert inner.calls == []
            assert stats.disk_cache_hits == 11


async def test_a_full_write_backlog_drops_writes_and_counts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backupfs.readpath import disksource

    monkeypatch.setattr(disksource, "WRITE_BACKLOG_BYTES", BS)
    data = os.urandom(8 * BS)
    inner, stats = FakeInner(data), Stats()
    disk = DiskCache(tmp_path, 1 << 30)
    image = make_image(data)
    # Two blocks do not fit a one-block backlog: served, not written, counted.
    assert await fetch(inner, disk, image, 0, 2 * BS, stats) == blocks_of(data, 0, 2 * BS)
    assert stats.disk_cache_writes_dropped == 1 and entries(tmp_path) == []
    # One does.
    assert await fetch(inner, disk, image, 2 * BS, 3 * BS, stats) == blocks_of(data, 2 * BS, 3 * BS)
    assert stats.disk_cache_writes_dropped == 1
    assert len(entries(tmp_path)) == BS // DBS
