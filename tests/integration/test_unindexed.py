"""Stores that were never indexed (`--no-index`), found from nginx's autoindex listing."""

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mounting import mounted, run_cli, sha256_file
from tests.support.nginx import Nginx

FILES = {
    "web01/2026-11-20T0300Z/disk0.img": 24 << 20,
    "web01/2026-11-21T0300Z/disk0.img": (2 << 20) + 12345,
    "db 01/2026-11-20/data é.img": 1 << 20,
}


@pytest.fixture
def plain_store(tmp_path: Path) -> Iterator[tuple[Nginx, dict[str, str]]]:
    root = tmp_path / "images"
    sha = {}
    for rel, size in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        sha[rel] = sha256_file(path)
    (root / "README.txt").write_text("not in a snapshot directory\n")
    (root / "web01" / ".hidden").mkdir()
    with Nginx(root, tmp_path / "nginx", "autoindex on;") as nginx:
        yield nginx, sha


def test_ls_finds_every_file_in_the_autoindex(plain_store: tuple[Nginx, dict[str, str]]) -> None:
    nginx, _ = plain_store
    result = run_cli("ls", "--json", "--no-index", nginx.url)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    got = {f"{r['host']}/{r['snapshot']}/{r['disk']}": r["size_bytes"] for r in rows}
    assert got == FILES
    assert "not digest-verified" in result.stderr


def test_an_unindexed_mount_serves_the_bytes_and_says_so(
    plain_store: tuple[Nginx, dict[str, str]], mnt: Path
) -> None:
    nginx, sha = plain_store
    with mounted(nginx.url, mnt, "no_index"):
        for rel, digest in sha.items():
            assert sha256_file(mnt / rel) == digest
        stats = json.loads((mnt / ".backupfs" / "stats").read_text())
        assert stats["unverified_disks"] == len(FILES)


def test_a_file_replaced_under_an_unindexed_mount_gives_eio(
    plain_store: tuple[Nginx, dict[str, str]], mnt: Path
) -> None:
    nginx, _ = plain_store
    rel = "web01/2026-11-20T0300Z/disk0.img"
    with mounted(nginx.url, mnt, "no_index", "cache_size=32M", "readahead=1M", "fill=off"):
        with open(mnt / rel, "rb") as f:
            first = f.read(64 << 10)
        path = nginx.root / rel
        replacement = os.urandom(path.stat().st_size)
        tmp = path.with_name("new")
        tmp.write_bytes(replacement)
        later = path.stat().st_mtime + 60  # nginx's ETag is mtime (in seconds) and size
        os.utime(tmp, (later, later))
        os.rename(tmp, path)
        with open(mnt / rel, "rb") as f, pytest.raises(OSError) as caught:
            f.seek(20 << 20)
            f.read(64 << 10)
        assert caught.value.errno == errno.EIO
        assert first != replacement[: 64 << 10]
