"""Prometheus metrics of a real mount: MNT/.backupfs/metrics, -o metrics_port= and
-o metrics_textfile= (docs/metrics.md)."""

import os
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backupfs.errors import EXIT_ERROR
from tests.integration.conftest import SMALL, Store
from tests.support.mounting import (
    daemon_pids,
    kill_daemons,
    mounted,
    read_stats,
    run_cli,
    sha256_file,
)
from tests.support.system import is_mounted, unmount

DISK = "web02/2026-11-19/data.img"  # read whole: no kernel readahead left in flight after
DISK_SIZE = SMALL[DISK]
Samples = dict[str, float]  # backupfs_* samples of this mount, by name (and quantile)


def _samples(text: str, mnt: Path) -> Samples:
    got = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("backupfs_"):
                assert s.labels["mount"] == str(mnt.resolve()), s
                got[s.name + s.labels.get("quantile", "")] = s.value
    return got


def _families(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text)}


def _metrics_file(mnt: Path) -> str:
    return (mnt / ".backupfs" / "metrics").read_text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text: str = reply.read().decode()
        return text


def test_metrics_file_agrees_with_the_stats_file(store: Store, mnt: Path) -> None:
    with mounted(store.url, mnt):
        assert sorted(os.listdir(mnt / ".backupfs")) == ["metrics", "stats", "volumes"]
        assert sha256_file(mnt / DISK) == store.sha256[DISK]
        stats = read_stats(mnt)
        got = _samples(_metrics_file(mnt), mnt)
        assert read_stats(mnt)["bytes_served"] == stats["bytes_served"]  # nothing moved
    assert got["backupfs_served_bytes_total"] == stats["bytes_served"] >= DISK_SIZE
    assert got["backupfs_fetched_bytes_total"] == stats["bytes_fetched"] >= DISK_SIZE
    assert got["backupfs_requests_total"] == stats["requests"] > 0
    assert got["backupfs_cache_misses_total"] == stats["cache_misses"] > 0
    assert got["backupfs_cache_bytes"] == stats["cache_bytes"]
    assert got["backupfs_verify_failures_total"] == 0
    assert got["backupfs_fetch_latency_seconds0.5"] == stats["fetch_p50_ms"] / 1000
    assert got["backupfs_mount_info"] == 1


def test_metrics_port_serves_the_same_families(store: Store, mnt: Path) -> None:
    port = _free_port()
    with mounted(store.url, mnt, f"metrics_port={port}"):
        assert sha256_file(mnt / DISK) == store.sha256[DISK]
        served = _scrape("127.0.0.1", port)
        from_file = _metrics_file(mnt)
        with pytest.raises(OSError):  # 127.0.0.1 only, not every address
            _scrape("127.0.0.2", port)
    ours = {name for name in _families(served) if name.startswith("backupfs_")}
    assert ours == _families(from_file)
    assert "process_resident_memory_bytes" in _families(served)
    over_http, in_file = _samples(served, mnt), _samples(from_file, mnt)
    assert over_http["backupfs_served_bytes_total"] >= DISK_SIZE
    assert over_http["backupfs_served_bytes_total"] == in_file["backupfs_served_bytes_total"]


def test_metrics_textfile_is_written_at_start_and_at_exit(
    store: Store, mnt: Path, tmp_path: Path
) -> None:
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    path = textfiles / "backupfs.prom"
    with mounted(store.url, mnt, f"metrics_textfile={path}"):
        at_start = _samples(path.read_text(), mnt)  # written before the mount was ready
        assert sha256_file(mnt / DISK) == store.sha256[DISK]
        stats = read_stats(mnt)
    assert at_start["backupfs_served_bytes_total"] == 0
    at_exit = _samples(path.read_text(), mnt)
    assert at_exit["backupfs_served_bytes_total"] == stats["bytes_served"] >= DISK_SIZE
    assert at_exit["backupfs_fetched_bytes_total"] == stats["bytes_fetched"]
    assert os.listdir(textfiles) == ["backupfs.prom"]  # no temporary file left


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_a_port_in_use_fails_the_mount_in_one_line(
    store: Store, mnt: Path, foreground: bool
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["-f"] if foreground else []
        try:
            result = run_cli("mount", *args, "-o", f"metrics_port={port}", store.url, str(mnt))
            assert result.returncode == EXIT_ERROR, result
            assert result.stdout == ""
            assert result.stderr == (
                f"backupfs: metrics_port={port}: cannot listen on 127.0.0.1:{port}: "
                "the port is in use\n"
            )
            assert not is_mounted(mnt) and not daemon_pids(mnt)
        finally:
            unmount(mnt, fuse=True)
            kill_daemons(mnt)


def test_a_textfile_that_cannot_be_written_fails_the_mount(
    store: Store, mnt: Path, tmp_path: Path
) -> None:
    path = tmp_path / "missing" / "backupfs.prom"
    try:
        result = run_cli("mount", "-o", f"metrics_textfile={path}", store.url, str(mnt))
        assert result.returncode == EXIT_ERROR, result
        assert result.stderr == (
            f"backupfs: metrics_textfile={path}: cannot write it: No such file or directory\n"
        )
        assert not is_mounted(mnt) and not daemon_pids(mnt)
    finally:
        unmount(mnt, fuse=True)
        kill_daemons(mnt)
