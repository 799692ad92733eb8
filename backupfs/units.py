"""Numbers as `backupfs` shows them to people: sizes in binary units (KiB, MiB, GiB), counts
with their noun, times in UTC. One place, so the progress line and the summary say the
same thing."""

import time


def human(n: float) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def plural(count: int, noun: str) -> str:
    """`1 file`, `2 files`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def utc(time_ns: int) -> str:
    """A time in nanoseconds since the epoch as 2026-11-20T03:00:00Z (`@SECONDS` beyond
    this platform's time_t)."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time_ns // 10**9))
    except (OverflowError, OSError, ValueError):
        return f"@{time_ns // 10**9}"
