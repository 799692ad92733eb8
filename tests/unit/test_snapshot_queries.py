"""The pure parts of find/diff: path globs, and reads of a second snapshot that take the
blocks whose digests did not change from the first."""

import pytest

from backupfs.plan.fsmeta import DataRun, FsError
from backupfs.snapshots.diff import SameBlocks
from backupfs.snapshots.files import _pieces
from backupfs.snapshots.walk import matches


@pytest.mark.parametrize(
    "pattern, path, want",
    [
        ("/etc/nginx/*.conf", "/etc/nginx/nginx.conf", True),
        ("/etc/nginx/*.conf", "/etc/nginx/conf.d/site.conf", False),
        ("/etc/nginx/**/*.conf", "/etc/nginx/conf.d/site.conf", True),
        ("/etc/nginx/**/*.conf", "/etc/nginx/nginx.conf", True),
        ("/etc/**", "/etc", True),
        ("*.conf", "/etc/nginx/conf.d/site.conf", True),
        ("README", "/usr/share/doc/x/README", True),
        ("/etc/hosts", "/etc/hostsx", False),
        ("/etc/?osts", "/etc/hosts", True),
    ],
)
def test_globs_work_on_whole_components(pattern: str, path: str, want: bool) -> None:
    assert matches(pattern, path) is want


def test_a_second_snapshot_reads_only_its_changed_blocks() -> None:
    a = bytes(range(256)) * 64  # 16 KiB, blocks of 4 KiB
    b = bytearray(a)
    b[5000:5010] = b"X" * 10  # in block 1
    b[13000] = 0  # in block 3
    asked: list[tuple[str, int, int]] = []

    def reader(name: str, data: bytes):  # type: ignore[no-untyped-def]
        def read(offset: int, length: int) -> bytes:
            asked.append((name, offset, length))
            return data[offset : offset + length]

        return read

    same = SameBlocks(reader("a", a), reader("b", bytes(b)), bytearray([0, 1, 0, 1]), 4096)
    assert same.read(100, 16000) == bytes(b)[100:16100]
    assert [x for x in asked if x[0] == "b"] == [("b", 4096, 4096), ("b", 12288, 3812)]
    assert same.is_changed(4095, 4097) and not same.is_changed(0, 4096)
    assert same.is_changed(16384, 16385)  # past what the digests cover: not known equal


def test_file_pieces_cover_holes_and_refuse_overlaps() -> None:
    runs = [DataRun(8192, 100_000, 4096), DataRun(0, 50_000, 4096)]
    assert _pieces(runs, 16384) == [(0, 50_000, 4096), (4096, -1, 4096), (8192, 100_000, 4096),
                                    (12288, -1, 4096)]  # fmt: skip
    with pytest.raises(FsError):
        _pieces([DataRun(0, 0, 8192), DataRun(4096, 0, 4096)], 8192)
    with pytest.raises(FsError):
        _pieces([DataRun(0, 0, 8192)], 4096)
