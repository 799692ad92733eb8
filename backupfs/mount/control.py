"""The hidden control directory `MNT/.backupfs/`: read-only files rendered on open.

`stats` is the stats document as JSON; `metrics` the same numbers in the Prometheus text
format (metrics.py, docs/metrics.md).

It is absent from directory listings (so `ls`, `find` and `rsync` of the mount never see
it) but answers a lookup by name. Its inodes sit far above the tree's, which count up
from 1. Its `volumes/` directory lists the volumes attach asked for (volumes.py). Pure
data: `view.py` answers lookups and opens with what this module renders.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass

from backupfs.mount import metrics
from backupfs.readpath.cache import BlockCache
from backupfs.readpath.readahead import StreamTracker
from backupfs.stats import Stats

CONTROL_DIR = ".backupfs"
CONTROL_DIR_INODE = 1 << 62
STATS_INODE = CONTROL_DIR_INODE + 1
VOLUMES_DIR = "volumes"
VOLUMES_REL = f"{CONTROL_DIR}/{VOLUMES_DIR}"  # where a volume is, relative to MNT
VOLUMES_DIR_INODE = CONTROL_DIR_INODE + 2
METRICS_INODE = CONTROL_DIR_INODE + 3
FILES = {"stats": STATS_INODE, "metrics": METRICS_INODE}


@dataclass
class StatsSources:
    """Where the stats file's numbers come from: one mount's counters, cache and settings."""

    store_url: str  # redacted: no credentials
    stats: Stats
    cache: BlockCache
    cache_max_bytes: int
    readahead_max_bytes: int
    started_s: float
    mountpoint: str = ""  # the metrics' `mount` label


def is_control(inode: int) -> bool:
    return inode >= CONTROL_DIR_INODE


def is_control_file(inode: int) -> bool:
    return inode in FILES.values()


def stats_document(
    sources: StatsSources, trackers: Iterable[StreamTracker], now_s: float
) -> dict[str, object]:
    """`trackers`: those of the open file handles, for their current readahead windows."""
    windows = sorted((s.window for t in trackers for s in t.streams if s.window), reverse=True)
    return {
        "store": sources.store_url,
        "uptime_s": round(now_s - sources.started_s, 1),
        **sources.stats.snapshot(),
        "blocks_in_cache": len(sources.cache),
        "cache_bytes": sources.cache.bytes_used,
        "cache_max_bytes": sources.cache_max_bytes,
        "readahead_windows": windows,
        "readahead_max_bytes": sources.readahead_max_bytes,
    }


def render(
    inode: int, sources: StatsSources, trackers: Iterable[StreamTracker], now_s: float
) -> bytes:
    if inode == STATS_INODE:
        return (json.dumps(stats_document(sources, trackers, now_s), indent=1) + "\n").encode()
    if inode == METRICS_INODE:
        return metrics.exposition(stats_document(sources, trackers, now_s), sources.mountpoint)
    raise KeyError(inode)
