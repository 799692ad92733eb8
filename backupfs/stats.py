"""Counters of one mount, shown by the stats control file and `backupfs stats`."""

from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    bytes_served: int = 0
    bytes_fetched: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    requests: int = 0
    requests_in_flight: int = 0
    retries: int = 0
    verify_failures: int = 0
    read_errors: int = 0
    disk_cache_hits: int = 0  # blocks read from cache_dir instead of fetched
    disk_cache_writes_dropped: int = 0  # fresh runs not written: the write backlog was full
    plan_bytes: int = 0  # bytes asked for by read plans and `backupfs warm`
    zero_bytes: int = 0  # blocks the digests say are zeros: made here, not fetched
    digest_bytes_fetched: int = 0  # chunks of digest files fetched (store format 2)
    digest_index_bytes: int = 0  # chunk indexes of the opened disks (kept while mounted)
    digest_cache_bytes: int = 0  # digest chunks held (part of cache_size=)
    fill_bytes: int = 0  # pushed into the kernel's page cache by the background fill
    fill_metadata_bytes: int = 0  # read by the fill's walks of ext filesystems' metadata
    fills_started: int = 0  # disks whose fill began
    fills_done: int = 0  # disks whose fill ended (all of it read, budget spent, or an error)
    unverified_disks: int = 0  # served without digests (an unindexed store: -o no_index)
    fetch_seconds: list[float] = field(default_factory=list, repr=False)

    def record_fetch(self, seconds: float) -> None:
        self.fetch_seconds.append(seconds)
        if len(self.fetch_seconds) > 4096:
            del self.fetch_seconds[:2048]

    def snapshot(self) -> dict[str, object]:
        doc = asdict(self)
        times = sorted(doc.pop("fetch_seconds"))
        doc["fetch_p50_ms"] = round(times[len(times) // 2] * 1000, 2) if times else None
        doc["fetch_p99_ms"] = round(times[int(len(times) * 0.99)] * 1000, 2) if times else None
        return doc
