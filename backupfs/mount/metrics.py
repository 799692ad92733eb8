"""A mount's counters as Prometheus metric families, built from its stats document.

The numbers are those of `control.stats_document` (the stats file's), so the stats file,
`MNT/.backupfs/metrics`, the metrics_port endpoint and the metrics_textfile always agree.
Every sample carries a `mount` label (the mountpoint): one node-exporter collects the
textfiles of many mounts. Pure: no trio, no I/O; `metrics_export.py` serves it. The
names, types and meanings are listed in docs/metrics.md.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

PREFIX = "backupfs_"
LABELS = ["mount"]
COUNTER, GAUGE = "counter", "gauge"
# The Prometheus text format, version 0.0.4 (what generate_latest writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Family:
    """One number of the stats document as a metric family (a counter's `_total` is
    added by the library)."""

    key: str  # in the stats document
    name: str  # without the prefix
    kind: str  # COUNTER or GAUGE
    help: str


FAMILIES = (
    Family("bytes_served", "served_bytes", COUNTER, "Bytes returned to readers of the mount."),
    Family(
        "bytes_fetched",
        "fetched_bytes",
        COUNTER,
        "Bytes of disk blocks fetched from the store and verified.",
    ),
    Family("cache_hits", "cache_hits", COUNTER, "Block reads answered by the memory block cache."),
    Family(
        "cache_misses", "cache_misses", COUNTER, "Block reads the memory cache could not answer."
    ),
    Family(
        "requests",
        "requests",
        COUNTER,
        "HTTP requests sent to the store (blocks and metadata), each attempt counted.",
    ),
    Family(
        "requests_in_flight", "requests_in_flight", GAUGE, "HTTP requests to the store now open."
    ),
    Family(
        "retries",
        "retries",
        COUNTER,
        "HTTP requests to the store retried after a transient failure.",
    ),
    Family(
        "verify_failures",
        "verify_failures",
        COUNTER,
        "Fetches whose blocks did not match the store's SHA-256 digests.",
    ),
    Family(
        "read_errors",
        "read_errors",
        COUNTER,
        "Block fetches that failed after their retries (readers may get EIO).",
    ),
    Family(
        "disk_cache_hits",
        "disk_cache_hits",
        COUNTER,
        "Blocks read from the cache_dir disk cache instead of fetched.",
    ),
    Family(
        "disk_cache_writes_dropped",
        "disk_cache_writes_dropped",
        COUNTER,
        "Fetched runs not written to cache_dir because its write backlog was full.",
    ),
    Family("plan_bytes", "plan_bytes", COUNTER, "Bytes asked for by read plans and backupfs warm."),
    Family(
        "zero_bytes",
        "zero_bytes",
        COUNTER,
        "Bytes of blocks the digests say are zeros: made locally, not fetched.",
    ),
    Family(
        "digest_bytes_fetched",
        "digest_fetched_bytes",
        COUNTER,
        "Bytes of digest file chunks fetched from the store.",
    ),
    Family(
        "digest_index_bytes",
        "digest_index_bytes",
        GAUGE,
        "Bytes of the chunk indexes of the opened disks' digest files.",
    ),
    Family(
        "digest_cache_bytes", "digest_cache_bytes", GAUGE, "Bytes of digest chunks held in memory."
    ),
    Family(
        "fill_bytes",
        "fill_bytes",
        COUNTER,
        "Bytes pushed into the kernel's page cache by the background fill.",
    ),
    Family(
        "fill_metadata_bytes",
        "fill_metadata_bytes",
        COUNTER,
        "Bytes read by the fill's walks of ext filesystems' metadata.",
    ),
    Family("fills_started", "fills_started", COUNTER, "Disks whose background fill began."),
    Family("fills_done", "fills_done", COUNTER, "Disks whose background fill ended."),
    Family(
        "unverified_disks",
        "unverified_disks",
        GAUGE,
        "Disks served without digests (an unindexed store, -o no_index).",
    ),
    Family("uptime_s", "uptime_seconds", GAUGE, "Seconds since the mount started."),
    Family("blocks_in_cache", "cache_blocks", GAUGE, "Blocks held in the memory block cache."),
    Family("cache_bytes", "cache_bytes", GAUGE, "Bytes held in the memory block cache."),
    Family("cache_max_bytes", "cache_max_bytes", GAUGE, "Size of the memory block cache."),
    Family(
        "readahead_max_bytes",
        "readahead_max_bytes",
        GAUGE,
        "Largest readahead window of one stream (-o readahead=).",
    ),
)
LATENCY_KEYS = {"fetch_p50_ms": "0.5", "fetch_p99_ms": "0.99"}  # key -> quantile label
# Keys of the stats document shown otherwise: the store as a label, the windows summed up.
OTHER_KEYS = {"store", "readahead_windows"}
LATENCY_HELP = "Duration of HTTP requests to the store, at a quantile of the last 2048 to 4096."


def _number(doc: Mapping[str, object], key: str) -> float:
    value = doc[key]
    if not isinstance(value, int | float):
        raise TypeError(f"stats document: {key} is {value!r}, not a number")
    return float(value)


def families(doc: Mapping[str, object], mount: str) -> Iterator[Metric]:
    """The metric families of one stats document (control.stats_document)."""
    info = InfoMetricFamily(
        PREFIX + "mount", "The mount and its store (credentials removed).", labels=LABELS
    )
    info.add_metric([mount], {"store": str(doc["store"])})
    yield info
    for family in FAMILIES:
        kind = CounterMetricFamily if family.kind == COUNTER else GaugeMetricFamily
        metric = kind(PREFIX + family.name, family.help, labels=LABELS)
        metric.add_metric([mount], _number(doc, family.key))
        yield metric
    latency = GaugeMetricFamily(
        PREFIX + "fetch_latency_seconds", LATENCY_HELP, labels=[*LABELS, "quantile"]
    )
    for key, quantile in LATENCY_KEYS.items():
        if doc[key] is not None:  # no fetch yet: no sample
            latency.add_metric([mount, quantile], _number(doc, key) / 1000)
    yield latency
    windows = doc["readahead_windows"]
    if not isinstance(windows, list):
        raise TypeError(f"stats document: readahead_windows is {windows!r}, not a list")
    streams = GaugeMetricFamily(
        PREFIX + "readahead_streams",
        "Sequential streams of the open files that have a readahead window.",
        labels=LABELS,
    )
    streams.add_metric([mount], len(windows))
    yield streams
    window = GaugeMetricFamily(
        PREFIX + "readahead_window_bytes",
        "Sum of the readahead windows of the open files' streams.",
        labels=LABELS,
    )
    window.add_metric([mount], float(sum(windows)))
    yield window


def shown_keys() -> set[str]:
    """The stats document's keys that the families show (a test checks none is missed)."""
    return {f.key for f in FAMILIES} | set(LATENCY_KEYS) | OTHER_KEYS


class MountCollector:
    """A prometheus_client collector: the families of a fresh stats document per collect.

    `document` is called on each collect, on the thread that collects: it must be safe
    there (metrics_export.py hands the HTTP server's threads one that asks trio's thread).
    """

    def __init__(self, mount: str, document: Callable[[], Mapping[str, object]]) -> None:
        self.mount = mount
        self._document = document

    def collect(self) -> Iterator[Metric]:
        return families(self._document(), self.mount)


def registry_of(collector: MountCollector) -> CollectorRegistry:
    """A registry of its own (not the library's global one) holding `collector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(doc: Mapping[str, object], mount: str) -> bytes:
    """One stats document in the Prometheus text format (the metrics control file)."""
    return generate_latest(registry_of(MountCollector(mount, lambda: doc)))
