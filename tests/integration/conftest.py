"""A real nginx serving a generated store for the whole session, a fresh mountpoint, the
attach run directory, and the guard against mounts and loop devices left behind."""

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupfs.store.indexer import index_store
from tests.support import mounting
from tests.support.attachment import attach_env
from tests.support.nginx import Nginx
from tests.support.proxy import FaultProxy
from tests.support.rgw import rgw  # noqa: F401  (the session's Ceph RGW fixture)
from tests.support.system import mount_points_under, remove_tree, unmount

mounting.DEFAULT_OPTIONS["fill"] = "off"  # see mounting.DEFAULT_OPTIONS; test_fill turns it on
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
        location = /html/backupfs-store.json {{
            default_type text/html;
            return 200 "<html><body>Welcome to nginx!</body></html>";
        }}
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


def _our_loop_devices(base: str) -> set[str]:
    proc = subprocess.run(["losetup", "-a"], capture_output=True, text=True, timeout=30)
    return {line.split(":")[0] for line in proc.stdout.splitlines() if base in line}


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves a mount or loop device behind (and undo them).

    Only mounts and loop devices under this pytest run's base temp directory count, so two
    runs on one machine do not take each other's for leftovers. It takes `tmp_path` so that
    it runs after the test's own fixtures are torn down and before pytest deletes `tmp_path`
    (never through a mount left there).
    """
    base = str(Path(tmp_path_factory.getbasetemp()).resolve())
    mounts_before, loops_before = set(mount_points_under(base)), _our_loop_devices(base + "/")
    yield
    left_mounts = set(mount_points_under(base)) - mounts_before
    left_loops = _our_loop_devices(base + "/") - loops_before
    for point in sorted(left_mounts, reverse=True):
        with contextlib.suppress(RuntimeError):
            unmount(point)
    for dev in left_loops:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
    assert not left_mounts and not left_loops, f"left behind: {left_mounts} {left_loops}"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root, nginx_dir = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("nginx")
    try:
        yield from _serve_store(root, nginx_dir)
    finally:
        remove_tree(root)
        remove_tree(nginx_dir)


def _serve_store(root: Path, nginx_dir: Path) -> Iterator[Store]:
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
    with Nginx(root, nginx_dir, NGINX_EXTRA) as nginx:
        yield Store(root, nginx.url, sha)


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    """The environment for backupfs attach and friends, with this test's run directory."""
    return attach_env(tmp_path / "run")


@pytest.fixture
def fault_proxy(store: Store) -> Iterator[FaultProxy]:
    from urllib.parse import urlsplit

    port = urlsplit(store.url).port
    assert port is not None
    with FaultProxy(port) as proxy:
        yield proxy
