"""Ctrl-C and SIGTERM during the copy phase of `backupfs restore`, through a real attachment
over a slow link: the restore stops within seconds with exit 130 and one line, leaves no
temporary files, keeps its marker, and the same command then completes the restore."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupfs.errors import EXIT_INTERRUPTED
from backupfs.store.indexer import index_store
from tests.support.attachment import attach_env, attached
from tests.support.disks import make_disk
from tests.support.fsimages import PartSpec
from tests.support.kernel import needs_filesystems
from tests.support.mounting import BACKUPFS, mounted, run_cli, sha256_file
from tests.support.nginx import Nginx
from tests.support.proxy import DelayProxy

pytestmark = needs_filesystems("ext4")

REL = "db02/2026-11-20T0300Z/disk0.img"
MARKER = ".backupfs-restore-in-progress"
TMP_PREFIX = ".backupfs-tmp."
LINK_MBIT = 80  # 10 MB/s: the ~70 MB tree takes several seconds to copy
EXIT_WITHIN_S = 3.0


@dataclass(frozen=True)
class Source:
    root: Path  # the restore source inside the attachment
    env: dict[str, str]
    sums: dict[str, str]  # relative path -> sha256


def _tree(root: Path) -> dict[str, str]:
    """200 small files in 10 directories and 4 large ones (streamed by the readers)."""
    sums = {}
    for i in range(200):
        rel = f"d{i % 10}/f{i:03d}.bin"
        sums[rel] = _write(root / rel, os.urandom(200_000 + i))
    for i in range(4):
        sums[f"big/b{i}.bin"] = _write(root / f"big/b{i}.bin", os.urandom(8 << 20))
    return sums


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    work = tmp_path_factory.mktemp("interrupt")
    sums = _tree(work / "tree")
    store = work / "store"
    (store / REL).parent.mkdir(parents=True)
    make_disk(store / REL, "none", [PartSpec("ext4", 160, "intr", work / "tree")])
    index_store(store, say=lambda _: None)
    mnt = work / "mnt"
    mnt.mkdir()
    env = attach_env(work / "run")
    with (
        Nginx(store, work / "nginx") as nginx,
        DelayProxy(nginx.port, rtt_ms=2, rate_mbit=LINK_MBIT) as proxy,
        mounted(proxy.url, mnt, "cache_size=64M"),
        attached(mnt / REL, work / "target", env) as att,
    ):
        yield Source(att.target / "p0", env, sums)


def _leftovers(dest: Path) -> list[str]:
    return [str(p.relative_to(dest)) for p in dest.rglob("*") if p.name.startswith(TMP_PREFIX)]


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True, timeout=60)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def _interrupt_mid_copy(source: Source, dest: Path, signum: int) -> tuple[int, float, str]:
    """Start a restore, wait until files are being written, send `signum`; return the exit
    status, the seconds from the signal to the exit, and stderr."""
    _drop_caches()
    proc = subprocess.Popen(
        [*BACKUPFS, "restore", "--no-plan", str(source.root), str(dest)],
        env=source.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(dest.glob("d*/f*.bin")):  # the copy phase has begun
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signum)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
        return proc.returncode, time.monotonic() - sent, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_copy_and_the_rerun_completes(
    source: Source, tmp_path: Path, signum: int
) -> None:
    dest = tmp_path / "dest"
    rc, seconds, err = _interrupt_mid_copy(source, dest, signum)
    assert rc == EXIT_INTERRUPTED, err
    assert err == "backupfs: interrupted\n"
    assert seconds < EXIT_WITHIN_S, f"took {seconds:.1f}s to stop"
    assert _leftovers(dest) == []
    assert (dest / MARKER).exists()  # a re-run resumes
    copied = [rel for rel in source.sums if (dest / rel).exists()]
    assert 0 < len(copied) < len(source.sums), "the signal did not land mid-copy"
    for rel in copied:  # what was renamed into place is whole
        assert sha256_file(dest / rel) == source.sums[rel], rel

    again = run_cli("restore", "--no-plan", str(source.root), str(dest), env=source.env)
    assert again.returncode == 0, again.stderr
    assert not (dest / MARKER).exists()
    for rel, digest in source.sums.items():
        assert sha256_file(dest / rel) == digest, rel
    assert _leftovers(dest) == []
