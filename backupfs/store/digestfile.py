"""Digest files of store format 2: per-block SHA-256 records, verified chunk by chunk.

A disk's digest file holds one 32-byte record per block of the image. In format 2 a
record of 32 zero bytes means "this block is all zeros" (no SHA-256 is zero), so the
digest file of a sparse image is itself sparse, and the read path needs to fetch neither
the zero blocks nor the digests of a region that is all holes. The digest file is cut
into chunks of CHUNK_BYTES; the chunk index (one SHA-256 per chunk) is what the
catalogue's `digest_index_sha256` names, so a reader fetches the small index when the
disk is opened and each chunk of records by range, when a read first needs it.

`write_digests` makes both from an image, skipping the holes the filesystem reports
(SEEK_DATA/SEEK_HOLE): a 4 TiB sparse image is indexed in a second.
"""

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from backupfs.ranges import block_count

DIGEST_SIZE = 32
CHUNK_BYTES = 64 << 10  # 2048 records: 128 MiB of image at 64 KiB blocks
ZERO_RECORD = bytes(DIGEST_SIZE)
INDEX_SUFFIX = ".chunks"  # the chunk index sits beside the digest file
# The largest chunk index a reader fetches: 2M chunks, 256 TiB of image at 64 KiB blocks.
MAX_INDEX_BYTES = 64 << 20


def index_path_of(digest_file: Path) -> Path:
    """Where the chunk index of a digest file is: beside it."""
    return digest_file.with_name(digest_file.name + INDEX_SUFFIX)


def digest_file_size(image_size: int, block_size: int) -> int:
    return block_count(block_size, image_size) * DIGEST_SIZE


def index_size(digest_size: int) -> int:
    return block_count(CHUNK_BYTES, digest_size) * DIGEST_SIZE


def chunk_span(chunk: int, digest_size: int) -> tuple[int, int]:
    """Byte range `[start, end)` of chunk number `chunk` in a digest file of that size."""
    start = chunk * CHUNK_BYTES
    return start, min(start + CHUNK_BYTES, digest_size)


def zero_chunk_hash(length: int) -> bytes:
    """The index entry of a chunk of `length` bytes of zero records (a region of holes)."""
    return hashlib.sha256(bytes(length)).digest()


def chunk_index(records: bytes) -> bytes:
    """The chunk index of a whole digest file (tests, and small files)."""
    return b"".join(
        hashlib.sha256(records[i : i + CHUNK_BYTES]).digest()
        for i in range(0, len(records), CHUNK_BYTES)
    )


def _data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """`[start, end)` of each region the filesystem says holds data (all of it when the
    filesystem cannot tell)."""
    segments, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == 6:  # ENXIO: no data after pos
                break
            return [(0, size)]  # EINVAL: SEEK_DATA not supported here
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        segments.append((start, end))
        pos = end
    return segments


class _RecordWriter:
    """Appends records to the digest file and hashes it chunk by chunk; runs of zero
    chunks are skipped with a seek (the file stays sparse there)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.pending = bytearray()
        self.index = bytearray()
        self.written = 0  # records emitted
        self._zero_hash = zero_chunk_hash(CHUNK_BYTES)

    def add(self, record: bytes) -> None:
        self.pending += record
        self.written += 1
        if len(self.pending) == CHUNK_BYTES:
            self._flush()

    def add_zeros(self, count: int) -> None:
        """`count` zero records: whole chunks of them cost a seek."""
        while count:
            if not self.pending and count * DIGEST_SIZE >= CHUNK_BYTES:
                whole = count * DIGEST_SIZE // CHUNK_BYTES
                self.out.seek(whole * CHUNK_BYTES, os.SEEK_CUR)
                self.index += self._zero_hash * whole
                self.written += whole * (CHUNK_BYTES // DIGEST_SIZE)
                count -= whole * (CHUNK_BYTES // DIGEST_SIZE)
                continue
            room = (CHUNK_BYTES - len(self.pending)) // DIGEST_SIZE
            take = min(room, count)
            self.pending += ZERO_RECORD * take
            self.written += take
            count -= take
            if len(self.pending) == CHUNK_BYTES:
                self._flush()

    def _flush(self) -> None:
        chunk = bytes(self.pending)
        self.index += hashlib.sha256(chunk).digest()
        if chunk.count(0) == len(chunk):
            self.out.seek(len(chunk), os.SEEK_CUR)
        else:
            self.out.write(chunk)
        self.pending.clear()

    def finish(self) -> bytes:
        if self.pending:
            self._flush()
        self.out.truncate(self.out.tell())  # a trailing hole still has its length
        return bytes(self.index)


def record_of(block: bytes, zeros: bytes) -> bytes:
    """A block's record: the zero record for a block of zeros (`zeros` is at least as long
    as the block), else its SHA-256."""
    return ZERO_RECORD if block == zeros[: len(block)] else hashlib.sha256(block).digest()


def write_digests(image: BinaryIO, size: int, block_size: int, out: BinaryIO) -> bytes:
    """Write the digest file of the first `size` bytes of `image` to `out` (positioned at
    0, empty) and return its chunk index. Blocks in holes are not read; blocks that read
    as zeros get the zero record too."""
    records = _RecordWriter(out)
    zeros = bytes(block_size)
    fd = image.fileno()
    for seg_start, seg_end in _data_segments(fd, size):
        first = seg_start // block_size
        records.add_zeros(max(0, first - records.written))  # the hole before this segment
        stop = block_count(block_size, seg_end)
        for n in range(max(first, records.written), stop):
            block = os.pread(fd, block_size, n * block_size)
            expected = min(block_size, size - n * block_size)
            if len(block) != expected:
                raise OSError(f"image shrank while hashing (block {n})")
            records.add(record_of(block, zeros))
    records.add_zeros(block_count(block_size, size) - records.written)
    return records.finish()
