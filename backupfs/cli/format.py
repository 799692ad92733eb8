"""Sizes and mount counters as `backupfs` prints them."""

from typing import Any

from backupfs.units import human


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def stats_lines(doc: dict[str, Any]) -> list[str]:
    hits, misses = doc["cache_hits"], doc["cache_misses"]
    rate = f" ({100 * hits / (hits + misses):.1f}% hits)" if hits + misses else ""
    windows = ", ".join(human(w) for w in doc["readahead_windows"]) or "none open"
    return [
        f"store            {doc['store']}",
        f"served           {human(doc['bytes_served'])}",
        f"fetched          {human(doc['bytes_fetched'])} in {doc['requests']} requests"
        f" ({doc['requests_in_flight']} in flight, {doc['retries']} retries)",
        f"cache            {hits} hits, {misses} misses{rate}; {doc['blocks_in_cache']} blocks,"
        f" {human(doc['cache_bytes'])} of {human(doc['cache_max_bytes'])}"
        " (cache_size= less the replies in flight and the digests)",
        f"digests          {human(doc['digest_bytes_fetched'])} fetched,"
        f" {human(doc['digest_cache_bytes'])} held, {human(doc['digest_index_bytes'])} of"
        f" chunk indexes; {human(doc['zero_bytes'])} of zero blocks made, not fetched",
        f"fetch latency    p50 {ms(doc['fetch_p50_ms'])}, p99 {ms(doc['fetch_p99_ms'])}",
        f"readahead        windows {windows} (max {human(doc['readahead_max_bytes'])})",
        f"errors           {doc['verify_failures']} verification failures,"
        f" {doc['read_errors']} failed fetches",
    ]
