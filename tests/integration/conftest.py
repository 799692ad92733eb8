"""A real nginx serving a generated store for the whole session, and a fresh mountpoint."""

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupfs.store.indexer import index_store
from tests.support.nginx import Nginx
from tests.support.proxy import FaultProxy

TOKEN = "s3cret-token-0123456789"
BIG = "web01/2026-11-20T0300Z/disk0.img"
BIG_SIZE = (256 << 20) + 12345  # not a multiple of the block size: the last block is short
SMALL = {
    "web01/2026-11-21T0300Z/disk0.img": (3 << 20) + 1,
    "web02/2026-11-19/data.img": 1 << 20,
}
NGINX_EXTRA = f"""
        location /private/ {{
            if ($http_authorization != "Bearer {TOKEN}") {{ return 401; }}
        }}
        location /norange/ {{ max_ranges 0; }}
        location /forbidden/ {{ return 403; }}
"""


@dataclass
class Store:
    root: Path
    url: str
    sha256: dict[str, str]

    def path(self, rel: str) -> Path:
        return self.root / rel


def _write_random(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 16 << 20))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _bad_store(root: Path, name: str, content: bytes) -> None:
    (root / name).mkdir()
    (root / name / "backupfs-store.json").write_bytes(content)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("store")
    sha = {BIG: _write_random(root / BIG, BIG_SIZE)}
    for rel, size in SMALL.items():
        sha[rel] = _write_random(root / rel, size)
    index_store(root, say=lambda _: None)
    for alias in ("private", "norange"):
        (root / alias).symlink_to(".")
    (root / "empty").mkdir()
    _bad_store(root, "badjson", b"{not json")
    hostile = {
        "format": "backupfs-store",
        "version": 1,
        "snapshots": [{"host": "..", "name": "etc", "time_ns": 0, "disks": []}],
    }
    _bad_store(root, "hostile", json.dumps(hostile).encode())
    newer = {"format": "backupfs-store", "version": 99, "snapshots": []}
    _bad_store(root, "newer", json.dumps(newer).encode())
    with Nginx(root, tmp_path_factory.mktemp("nginx"), NGINX_EXTRA) as nginx:
        yield Store(root, nginx.url, sha)


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def fault_proxy(store: Store) -> Iterator[FaultProxy]:
    from urllib.parse import urlsplit

    port = urlsplit(store.url).port
    assert port is not None
    with FaultProxy(port) as proxy:
        yield proxy
