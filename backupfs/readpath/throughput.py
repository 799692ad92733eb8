"""How fast the store delivers lately, for sizing readahead to the link. Pure logic.

The rate is bytes over the time fetches were in flight (the union of their intervals in
the last `window_s`), so idle time between bursts of reading does not make a fast link
look slow. Fed by BlockReader with each completed fetch run.
"""

from collections import deque


class Throughput:
    def __init__(self, window_s: float = 4.0, min_bytes: int = 1 << 20) -> None:
        self.window_s = window_s
        self.min_bytes = min_bytes  # less than this seen: no estimate yet
        self._done: deque[tuple[float, float, int]] = deque()  # (start_s, end_s, bytes)
        self._rate: float | None = None  # computed per completed fetch, not per read
        self._newest_s = float("-inf")

    def record(self, start_s: float, end_s: float, size_bytes: int) -> None:
        self._done.append((start_s, end_s, size_bytes))
        while self._done and self._done[0][1] < end_s - self.window_s:
            self._done.popleft()
        while len(self._done) > 64:
            self._done.popleft()
        self._newest_s = max(self._newest_s, end_s)
        self._rate = self._busy_rate()

    def rate(self, now_s: float) -> float | None:
        """Bytes per second, or None while too little has been seen lately. Cheap: the
        FUSE read path asks on every read."""
        return self._rate if self._newest_s >= now_s - self.window_s else None

    def _busy_rate(self) -> float | None:
        total = sum(d[2] for d in self._done)
        if total < self.min_bytes:
            return None
        busy, reach = 0.0, float("-inf")
        for start, end, _ in sorted(self._done):
            if end > reach:
                busy += end - max(start, reach)
                reach = end
        return total / busy if busy > 0 else None
