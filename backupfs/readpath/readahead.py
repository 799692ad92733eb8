"""Sequential-stream detection and a readahead window that grows. Pure logic, no I/O.

An open image carries several interleaved sequential streams (parallel readers over
one loop device, or over the loop devices of an attachment's clones, each its own file
handle), so the image's one tracker, shared by its handles, keeps a few `Stream`s and
matches each read to the nearest one: a stream read in turn through several handles is
sequential on the image and on none of the handles. The kernel's own readahead delivers
reads slightly out of order, so a jump within `slack_bytes` of the expected offset still
counts as sequential.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReadaheadConfig:
    initial_bytes: int = 1 << 20  # first window after two sequential reads
    max_bytes: int = 64 << 20  # the window doubles up to this (mount option readahead=)
    slack_bytes: int = 1 << 20  # out-of-order tolerance before a read counts as a seek
    max_streams: int = 8  # sequential streams tracked per open image
    min_density: float = 0.5  # share of a stream's span actually read, else it is sparse


@dataclass
class Stream:
    next_offset: int
    start_offset: int = 0  # where the stream began
    bytes_read: int = 0
    window: int = 0
    prefetched_to: int = 0
    last_use: int = 0

    @property
    def density(self) -> float:
        span = self.next_offset - self.start_offset
        return self.bytes_read / span if span > 0 else 1.0


@dataclass
class StreamTracker:
    """Decides, for each read of one open image, which byte range to prefetch."""

    config: ReadaheadConfig
    streams: list[Stream] = field(default_factory=list)
    _clock: int = 0

    def on_read(
        self, offset: int, size: int, limit_bytes: int | None = None
    ) -> tuple[int, int] | None:
        """Record a read; return `[start, end)` to prefetch, or None. `limit_bytes` caps the
        window below `max_bytes` (what the link delivers in a second: see blocks.py)."""
        largest = (
            self.config.max_bytes
            if limit_bytes is None
            else min(self.config.max_bytes, max(limit_bytes, self.config.initial_bytes))
        )
        self._clock += 1
        end = offset + size
        stream = self._match(offset)
        if stream is None:
            self._remember(Stream(end, offset, size, last_use=self._clock))
            return None
        stream.last_use = self._clock
        stream.bytes_read += size
        if end <= stream.next_offset - self.config.slack_bytes:
            return None  # a late read from behind the stream's head: already handled
        stream.next_offset = max(stream.next_offset, end)
        if stream.density < self.config.min_density:
            # Small reads with gaps, in rising order (scattered files of a filesystem):
            # not a stream worth reading ahead for.
            stream.window = 0
            return None
        head = stream.next_offset
        if stream.window == 0:
            stream.window = min(self.config.initial_bytes, largest)
        elif stream.prefetched_to - head >= min(stream.window, largest) // 2:
            return None  # enough in flight; top up in large steps, not per read
        else:
            # The stream consumed half its window: it is worth a larger one.
            stream.window = min(stream.window * 2, largest)
        start = max(stream.prefetched_to, head)
        stream.prefetched_to = head + stream.window
        return start, stream.prefetched_to

    def _match(self, offset: int) -> Stream | None:
        best: Stream | None = None
        for stream in self.streams:
            lo = stream.next_offset - self.config.slack_bytes
            hi = stream.next_offset + self.config.slack_bytes
            if lo <= offset <= hi and (
                best is None or abs(offset - stream.next_offset) < abs(offset - best.next_offset)
            ):
                best = stream
        return best

    def _remember(self, stream: Stream) -> None:
        if len(self.streams) >= self.config.max_streams:
            self.streams.remove(min(self.streams, key=lambda s: s.last_use))
        self.streams.append(stream)
