"""What read plans and `backupfs warm` told the read path, as plain bookkeeping.

`PlanBook` owns two maps, both keyed by `(image_id, block_no)`:
- planned blocks: bytes of the block a restore plan will read and has not read yet, the
  plan's cursor, and the plan position of the range that holds them;
- hinted blocks: keys a plan or `warm` asked for, an LRU used as a bounded set.

Reading a planned or hinted block says nothing about what comes next, so such reads do not
drive readahead (`covers`). Serving planned bytes moves the plan's cursor, and a block
whose planned bytes were all served may leave the cache: the kernel's page cache holds it
now (`consume`). No I/O and no awaits; trio only for the event in `PlanCursor`.
"""

from collections.abc import Iterable

import trio
from cachetools import LRUCache

from backupfs.ranges import block_range, block_span, overlap
from backupfs.readpath.cache import BlockKey
from backupfs.store.image import Image


class PlanCursor:
    """How far the readers of one read plan got: the plan position (bytes of the plan up
    to the end of a range) of the furthest planned block served so far."""

    def __init__(self) -> None:
        self.position = 0
        self.moved = trio.Event()  # replaced each time the position advances

    def advance(self, position: int) -> None:
        if position > self.position:
            self.position = position
            self.moved.set()
            self.moved = trio.Event()


class _Planned:
    __slots__ = ("left", "cursor", "position")

    def __init__(self, left: int, cursor: PlanCursor, position: int) -> None:
        self.left = left  # planned bytes of the block not served yet
        self.cursor = cursor
        self.position = position


class PlanBook:
    def __init__(self, hinted_blocks: int) -> None:
        self._planned: dict[BlockKey, _Planned] = {}
        self._hinted: LRUCache[BlockKey, None] = LRUCache(maxsize=hinted_blocks)

    @property
    def active(self) -> bool:
        """Whether any block is planned or hinted; if not, reads need not ask."""
        return bool(self._planned or self._hinted)

    def add(self, image: Image, start: int, end: int, cursor: PlanCursor, position: int) -> None:
        """Record that `cursor`'s plan reads `[start, end)`, a range that ends at plan
        position `position`. A block planned twice adds up its bytes; it keeps the cursor
        and position of its first range."""
        bs = image.block_size
        for n in block_range(start, end - start, bs, image.size_bytes):
            key = (image.image_id, n)
            lo, hi = block_span(n, bs, image.size_bytes)
            planned = self._planned.get(key)
            if planned is None:
                self._planned[key] = _Planned(overlap(start, end, lo, hi), cursor, position)
            else:
                planned.left += overlap(start, end, lo, hi)

    def hint(self, image: Image, block_nos: Iterable[int]) -> None:
        """Record that `warm` asked for these blocks (the oldest hints are forgotten first)."""
        for n in block_nos:
            self._hinted[(image.image_id, n)] = None

    def covers(self, image: Image, block_nos: Iterable[int]) -> bool:
        """Whether every one of these blocks is planned or hinted."""
        return all(
            (image.image_id, n) in self._planned or (image.image_id, n) in self._hinted
            for n in block_nos
        )

    def consume(self, image: Image, start: int, end: int) -> list[BlockKey]:
        """Bytes `[start, end)` were served: move the cursors of the planned blocks among
        them, and return the keys of those whose planned bytes have now all been served
        (they are planned no longer)."""
        if not self._planned:
            return []
        bs = image.block_size
        done: list[BlockKey] = []
        for n in block_range(start, end - start, bs, image.size_bytes):
            key = (image.image_id, n)
            planned = self._planned.get(key)
            if planned is None:
                continue
            planned.cursor.advance(planned.position)
            lo, hi = block_span(n, bs, image.size_bytes)
            planned.left -= overlap(start, end, lo, hi)
            if planned.left <= 0:
                del self._planned[key]
                done.append(key)
        return done

    def forget(self, cursor: PlanCursor) -> None:
        """A plan ended: its blocks are planned no longer (hints stay until they age out)."""
        for key in [k for k, p in self._planned.items() if p.cursor is cursor]:
            del self._planned[key]
