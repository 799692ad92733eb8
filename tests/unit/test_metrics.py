"""Prometheus metrics of a mount (backupfs/mount/metrics.py, metrics_export.py): the text
parsed back with prometheus_client's own parser must give the Stats object's numbers."""

import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from backupfs.errors import UserError, user_error_in
from backupfs.mount import control, metrics, metrics_export
from backupfs.mount.control import METRICS_INODE, STATS_INODE, StatsSources
from backupfs.mount.tree import build_tree
from backupfs.mount.view import ControlFile, MountView
from backupfs.options import MountOptions
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.readahead import ReadaheadConfig, Stream, StreamTracker
from backupfs.stats import Stats
from backupfs.store.manifest import Catalogue

MOUNT = "/mnt/backups"
URL = "https://backup.example/store/"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _stats() -> Stats:
    """Every counter a different value, so a metric showing the wrong one is seen."""
    stats = Stats()
    for n, name in enumerate(f for f in vars(stats) if f != "fetch_seconds"):
        setattr(stats, name, 1000 + 17 * n)
    for ms in (40, 10, 30, 20, 990):
        stats.record_fetch(ms / 1000)
    return stats


def _sources(stats: Stats) -> StatsSources:
    sources = StatsSources(URL, stats, BlockCache(1 << 20, stats), 1 << 20, 8 << 20, 100.0, MOUNT)
    sources.cache.put(("img", 0), b"x" * 1000)
    sources.cache.put(("img", 1), b"y" * 500)
    return sources


def _trackers() -> list[StreamTracker]:
    config = ReadaheadConfig()
    return [
        StreamTracker(config, [Stream(0, window=1 << 20), Stream(0, window=0)]),
        StreamTracker(config, [Stream(0, window=4 << 20)]),
    ]


def _samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _one(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"mount": MOUNT, **labels}.items())))]


def test_metrics_parse_back_to_the_stats_values() -> None:
    stats = _stats()
    sources = _sources(stats)
    text = control.render(METRICS_INODE, sources, _trackers(), now_s=142.25).decode()
    got = _samples(text)
    assert _one(got, "backupfs_served_bytes_total") == stats.bytes_served
    assert _one(got, "backupfs_fetched_bytes_total") == stats.bytes_fetched
    assert _one(got, "backupfs_requests_total") == stats.requests
    assert _one(got, "backupfs_requests_in_flight") == stats.requests_in_flight
    assert _one(got, "backupfs_retries_total") == stats.retries
    assert _one(got, "backupfs_verify_failures_total") == stats.verify_failures
    assert _one(got, "backupfs_read_errors_total") == stats.read_errors
    assert _one(got, "backupfs_cache_hits_total") == stats.cache_hits
    assert _one(got, "backupfs_cache_misses_total") == stats.cache_misses
    assert _one(got, "backupfs_fill_bytes_total") == stats.fill_bytes
    assert _one(got, "backupfs_fills_done_total") == stats.fills_done
    assert _one(got, "backupfs_digest_fetched_bytes_total") == stats.digest_bytes_fetched
    assert _one(got, "backupfs_unverified_disks") == stats.unverified_disks
    assert _one(got, "backupfs_cache_blocks") == 2
    assert _one(got, "backupfs_cache_bytes") == 1500
    assert _one(got, "backupfs_cache_max_bytes") == 1 << 20
    assert _one(got, "backupfs_readahead_max_bytes") == 8 << 20
    assert _one(got, "backupfs_readahead_streams") == 2
    assert _one(got, "backupfs_readahead_window_bytes") == 5 << 20
    assert _one(got, "backupfs_uptime_seconds") == 42.2  # as the stats file rounds it
    assert _one(got, "backupfs_fetch_latency_seconds", quantile="0.5") == 0.03
    assert _one(got, "backupfs_fetch_latency_seconds", quantile="0.99") == 0.99
    assert _one(got, "backupfs_mount_info", store=URL) == 1


def test_every_number_of_the_stats_file_is_a_metric() -> None:
    """A counter added to Stats (or the stats document) without a metric fails here."""
    stats = _stats()
    sources = _sources(stats)
    doc = control.stats_document(sources, _trackers(), 142.25)
    assert set(doc) == metrics.shown_keys()
    got = _samples(metrics.exposition(doc, MOUNT).decode())
    for family in metrics.FAMILIES:
        suffix = "_total" if family.kind == metrics.COUNTER else ""
        assert _one(got, f"backupfs_{family.name}{suffix}") == doc[family.key], family


def test_families_follow_the_conventions() -> None:
    doc = control.stats_document(_sources(_stats()), _trackers(), 142.25)
    families = list(text_string_to_metric_families(metrics.exposition(doc, MOUNT).decode()))
    assert len({f.name for f in families}) == len(families) == len(metrics.FAMILIES) + 4
    for family in families:
        assert family.name.startswith("backupfs_") and family.documentation, family.name
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
        if "bytes" in family.name:
            assert family.name.endswith("_bytes"), family.name
        assert family.samples and all(s.labels["mount"] == MOUNT for s in family.samples)


def test_no_fetch_yet_gives_no_latency_samples() -> None:
    stats = Stats(bytes_served=5)
    text = control.render(METRICS_INODE, _sources(stats), [], now_s=100.0).decode()
    got = _samples(text)
    assert not [k for k in got if k[0] == "backupfs_fetch_latency_seconds"]
    assert "# TYPE backupfs_fetch_latency_seconds gauge" in text
    assert _one(got, "backupfs_served_bytes_total") == 5
    assert _one(got, "backupfs_readahead_streams") == 0


def test_the_control_file_is_listed_and_rendered_at_each_open() -> None:
    stats = Stats()
    sources = _sources(stats)
    tree = build_tree(Catalogue(()), URL, 0)
    view = MountView(tree, sources, allow_other=False, uid=0, gid=0)
    assert view.lookup(control.CONTROL_DIR_INODE, "metrics").inode == METRICS_INODE
    names = [name for _, name in view.entries(control.CONTROL_DIR_INODE)]
    assert names == ["stats", "volumes", "metrics"]
    first = view.open_file(METRICS_INODE, os.O_RDONLY)
    stats.bytes_served = 12345
    second = view.open_file(METRICS_INODE, os.O_RDONLY)
    assert isinstance(first, ControlFile) and isinstance(second, ControlFile)
    assert _one(_samples(first.contents.decode()), "backupfs_served_bytes_total") == 0
    assert _one(_samples(second.contents.decode()), "backupfs_served_bytes_total") == 12345
    assert view.attributes(METRICS_INODE).size == len(second.contents)
    stats_file = view.open_file(STATS_INODE, os.O_RDONLY)
    assert isinstance(stats_file, ControlFile) and stats_file.contents.startswith(b"{")


def test_textfile_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "backupfs.prom"
    doc = control.stats_document(_sources(Stats(bytes_served=7)), [], 100.0)
    metrics_export.write_textfile(path, doc, MOUNT)
    inode = path.stat().st_ino
    metrics_export.write_textfile(path, {**doc, "bytes_served": 9}, MOUNT)
    assert path.stat().st_ino != inode  # renamed over, never rewritten in place
    assert _one(_samples(path.read_text()), "backupfs_served_bytes_total") == 9
    assert os.listdir(tmp_path) == ["backupfs.prom"]  # no temporary file left


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> None:
    """A new exporter (a new mount) can listen on `port`: the old one closed its socket.
    (A plain bind could fail on the scrapes' connections in TIME_WAIT; the server, as
    every HTTP server, binds with SO_REUSEADDR, which still fails on a listening socket.)"""
    metrics_export.HttpExporter(port, metrics.MountCollector(MOUNT, dict)).close()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text: str = reply.read().decode()
        return text


def test_http_exporter_serves_and_frees_its_port() -> None:
    stats = Stats(bytes_served=4242)
    sources = _sources(stats)
    collector = metrics.MountCollector(
        MOUNT, lambda: control.stats_document(sources, [], time.monotonic())
    )
    port = _free_port()
    exporter = metrics_export.HttpExporter(port, collector)
    try:
        assert _one(_samples(_scrape(port)), "backupfs_served_bytes_total") == 4242
        stats.bytes_served = 5000  # each scrape collects afresh
        text = _scrape(port)
        assert _one(_samples(text), "backupfs_served_bytes_total") == 5000
        assert "process_resident_memory_bytes" in text  # the HTTP endpoint only
    finally:
        exporter.close()
    _port_is_free(port)


def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        collector = metrics.MountCollector(MOUNT, dict)
        with pytest.raises(UserError) as err:
            metrics_export.HttpExporter(port, collector)
    assert str(err.value) == (
        f"metrics_port={port}: cannot listen on 127.0.0.1:{port}: the port is in use"
    )


async def test_export_writes_at_start_and_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_export, "TEXTFILE_INTERVAL_S", 0.05)
    path = tmp_path / "m.prom"
    stats = Stats(bytes_served=1)
    opts = MountOptions(metrics_textfile=path)
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics_export.export, opts, _sources(stats), _trackers)
        assert _one(_samples(path.read_text()), "backupfs_served_bytes_total") == 1
        stats.bytes_served = 2
        with trio.fail_after(10):
            while True:
                if _one(_samples(path.read_text()), "backupfs_served_bytes_total") == 2:
                    break
                await trio.sleep(0.02)
        assert _one(_samples(path.read_text()), "backupfs_readahead_streams") == 2
        nursery.cancel_scope.cancel()


async def test_export_writes_once_more_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "m.prom"
    stats = Stats(bytes_served=1)
    opts = MountOptions(metrics_textfile=path)  # every 15 s: not within this test
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics_export.export, opts, _sources(stats), _trackers)
        assert _one(_samples(path.read_text()), "backupfs_served_bytes_total") == 1
        stats.bytes_served = 3
        nursery.cancel_scope.cancel()
    text = path.read_text()
    assert _one(_samples(text), "backupfs_served_bytes_total") == 3
    assert "process_" not in text  # no unlabelled samples to collide with other mounts'


async def test_export_scrapes_through_trio_and_stops_with_the_task() -> None:
    stats = Stats(bytes_served=77)
    port = _free_port()
    opts = MountOptions(metrics_port=port)
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics_export.export, opts, _sources(stats), _trackers)
        text = await trio.to_thread.run_sync(_scrape, port)
        assert _one(_samples(text), "backupfs_served_bytes_total") == 77
        assert _one(_samples(text), "backupfs_readahead_window_bytes") == 5 << 20
        nursery.cancel_scope.cancel()
    _port_is_free(port)


async def test_export_refuses_a_textfile_it_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "m.prom"
    port = _free_port()
    opts = MountOptions(metrics_textfile=path, metrics_port=port)
    with pytest.raises(BaseException) as err:  # noqa: B017 - the UserError inside a group
        async with trio.open_nursery() as nursery:
            await nursery.start(metrics_export.export, opts, _sources(Stats()), list)
    assert (
        str(user_error_in(err.value))
        == f"metrics_textfile={path}: cannot write it: No such file or directory"
    )
    _port_is_free(port)  # the HTTP server it had started is stopped
