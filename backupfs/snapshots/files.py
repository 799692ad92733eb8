"""A file's bytes from its data runs: holes are zeros, runs are read in pieces in parallel
(like a read plan), and handed out in file order."""

import concurrent.futures
import hashlib
from collections.abc import Iterator

from backupfs.plan.fsmeta import DataRun, FileInfo, FsError, FsReader, Read

PIECE_BYTES = 4 << 20
WORKERS = 8


def _pieces(runs: list[DataRun], size: int) -> list[tuple[int, int, int]]:
    """(file offset, image offset or -1 for zeros, length), covering [0, size) in order."""
    out, pos = [], 0
    for run in sorted(runs, key=lambda r: r.file_offset):
        if run.file_offset < pos or run.file_offset + run.length > size:
            raise FsError("a file's data runs overlap or pass its size")
        if run.file_offset > pos:
            out.append((pos, -1, run.file_offset - pos))
        for at in range(0, run.length, PIECE_BYTES):
            length = min(PIECE_BYTES, run.length - at)
            out.append((run.file_offset + at, run.image_offset + at, length))
        pos = run.file_offset + run.length
    if pos < size:
        out.append((pos, -1, size - pos))
    return out


def file_bytes(fs: FsReader, read: Read, info: FileInfo) -> Iterator[bytes]:
    """The file's bytes in order, at most WORKERS pieces in flight."""
    pieces = _pieces(fs.data_runs(info), info.size)

    def one(piece: tuple[int, int, int]) -> bytes:
        _, at, length = piece
        if at < 0:
            return bytes(length)
        data = read(at, length)
        if len(data) != length:
            raise FsError(f"short read of inode {info.number}")
        return data

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for start in range(0, len(pieces), WORKERS * 4):
            yield from pool.map(one, pieces[start : start + WORKERS * 4])


def sha256_of(fs: FsReader, read: Read, info: FileInfo) -> str:
    digest = hashlib.sha256()
    for chunk in file_bytes(fs, read, info):
        digest.update(chunk)
    return digest.hexdigest()
