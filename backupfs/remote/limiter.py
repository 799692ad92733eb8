"""A connection limit with two queues: reads someone waits for go before prefetching.

`trio.CapacityLimiter` is one FIFO: a demand read queued behind 16 readahead requests
waits for all of them on a slow link. Here an urgent acquirer takes the next free slot
before any background one that waits; within each class the order is FIFO. A released
slot is handed straight to the next waiter, so no third task can take it in between.
"""

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class PriorityLimiter:
    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self._urgent: deque[trio.Event] = deque()
        self._background: deque[trio.Event] = deque()

    @asynccontextmanager
    async def slot(self, urgent: bool) -> AsyncIterator[None]:
        await self._acquire(urgent)
        try:
            yield
        finally:
            self._release()

    @property
    def waiting(self) -> tuple[int, int]:
        """(urgent, background) acquirers waiting for a slot."""
        return len(self._urgent), len(self._background)

    async def _acquire(self, urgent: bool) -> None:
        queue = self._urgent if urgent else self._background
        ahead = self._urgent or (not urgent and self._background)
        if self.held < self.total and not ahead:
            self.held += 1
            await trio.lowlevel.checkpoint()
            return
        given = trio.Event()
        queue.append(given)
        try:
            await given.wait()  # _release handed its slot over: `held` already counts it
        except BaseException:
            if given.is_set():
                self._release()  # handed over, but we were cancelled: pass it on
            else:
                queue.remove(given)
            raise

    def _release(self) -> None:
        for queue in (self._urgent, self._background):
            if queue:
                queue.popleft().set()
                return
        self.held -= 1
