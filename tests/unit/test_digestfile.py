"""store.digestfile: the format 2 digest file of sparse and dense images, compared with
records computed here from the image's bytes, block by block."""

import hashlib
import os
from pathlib import Path

import pytest

from backupfs.store import digestfile
from backupfs.store.digestfile import CHUNK_BYTES, ZERO_RECORD

BS = 4096
RECORDS_PER_CHUNK = CHUNK_BYTES // 32


def reference_records(data: bytes, block_size: int) -> bytes:
    out = bytearray()
    for pos in range(0, len(data), block_size):
        block = data[pos : pos + block_size]
        out += ZERO_RECORD if block.count(0) == len(block) else hashlib.sha256(block).digest()
    return bytes(out)


def index_of(image: Path, out: Path, block_size: int = BS) -> bytes:
    with open(image, "rb") as f, open(out, "wb") as o:
        return digestfile.write_digests(f, image.stat().st_size, block_size, o)


def sparse_image(path: Path, size: int, writes: dict[int, bytes]) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path.read_bytes()


CHUNK_SPAN = RECORDS_PER_CHUNK * BS  # image bytes covered by one chunk of records


@pytest.mark.parametrize(
    "writes",
    [
        {},
        {0: os.urandom(100)},
        {5: os.urandom(BS)},  # straddles blocks 0 and 1
        {CHUNK_SPAN - 10: os.urandom(20)},  # straddles two chunks
        {BS * 7: bytes(BS * 3)},  # data the filesystem holds, all zeros
        {3 * CHUNK_SPAN + 1: b"x", 3 * CHUNK_SPAN + BS - 1: b"y"},  # two writes, one block
        {i * 3 * BS + 17: os.urandom(2 * BS) for i in range(40)},
    ],
    ids=["hole", "head", "straddle", "chunk-edge", "written-zeros", "one-block", "scattered"],
)
@pytest.mark.parametrize("size", [5 * CHUNK_SPAN, 5 * CHUNK_SPAN - 1234], ids=["even", "short"])
def test_records_and_index_match_the_bytes(
    tmp_path: Path, writes: dict[int, bytes], size: int
) -> None:
    image, out = tmp_path / "disk.img", tmp_path / "disk.img.sha256"
    data = sparse_image(image, size, writes)
    index = index_of(image, out)
    records = out.read_bytes()
    assert records == reference_records(data, BS)
    assert len(records) == digestfile.digest_file_size(size, BS)
    assert index == digestfile.chunk_index(records)
    assert len(index) == digestfile.index_size(len(records))


def test_a_dense_image_matches_too(tmp_path: Path) -> None:
    image, out = tmp_path / "disk.img", tmp_path / "d"
    image.write_bytes(os.urandom(3 * CHUNK_SPAN + 5))
    assert index_of(image, out) == digestfile.chunk_index(out.read_bytes())
    assert out.read_bytes() == reference_records(image.read_bytes(), BS)


def test_the_digest_file_of_a_sparse_image_is_sparse(tmp_path: Path) -> None:
    image, out = tmp_path / "disk.img", tmp_path / "d"
    with open(image, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB: 32 MiB of records at 64 KiB blocks
        f.seek(40 << 30)
        f.write(b"data")
    index = index_of(image, out, 64 << 10)
    assert out.stat().st_size == 32 << 20
    assert out.stat().st_blocks * 512 <= 1 << 20  # the one chunk that is not all zeros
    assert len(index) == (32 << 20) // CHUNK_BYTES * 32
    zero_hash = digestfile.zero_chunk_hash(CHUNK_BYTES)
    others = [i for i in range(0, len(index), 32) if index[i : i + 32] != zero_hash]
    assert others == [(40 << 30) // (64 << 10) * 32 // CHUNK_BYTES * 32]


def test_chunk_span_and_sizes() -> None:
    assert digestfile.digest_file_size(0, BS) == 0
    assert digestfile.digest_file_size(1, BS) == 32
    assert digestfile.index_size(0) == 0
    assert digestfile.index_size(CHUNK_BYTES + 1) == 64
    assert digestfile.chunk_span(1, CHUNK_BYTES + 32) == (CHUNK_BYTES, CHUNK_BYTES + 32)
