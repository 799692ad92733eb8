"""remote.limiter.PriorityLimiter: at most N holders, urgent waiters before background ones,
FIFO within each class, and a cancelled waiter never loses or leaks a slot."""

import trio
import trio.testing

from backupfs.remote.limiter import PriorityLimiter


async def test_urgent_waiters_go_before_background_ones() -> None:
    limiter = PriorityLimiter(1)
    order: list[str] = []
    release = trio.Event()

    async def hold() -> None:
        async with limiter.slot(urgent=False):
            await release.wait()

    async def take(name: str, urgent: bool) -> None:
        async with limiter.slot(urgent):
            order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        for name, urgent in [("bg1", False), ("bg2", False), ("u1", True), ("u2", True)]:
            nursery.start_soon(take, name, urgent)
            await trio.testing.wait_all_tasks_blocked()
        assert limiter.waiting == (2, 2)
        release.set()
    assert order == ["u1", "u2", "bg1", "bg2"]
    assert limiter.held == 0


async def test_never_more_than_total_holders() -> None:
    limiter = PriorityLimiter(3)
    inside = peak = 0

    async def worker(i: int) -> None:
        nonlocal inside, peak
        async with limiter.slot(urgent=i % 2 == 0):
            inside += 1
            peak = max(peak, inside)
            await trio.sleep(0.001 * (i % 4))
            inside -= 1

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(worker, i)
    assert peak == 3 and limiter.held == 0


async def test_a_cancelled_waiter_neither_keeps_nor_loses_a_slot() -> None:
    limiter = PriorityLimiter(1)
    release = trio.Event()
    got: list[str] = []

    async def hold() -> None:
        async with limiter.slot(urgent=True):
            await release.wait()

    async def take(name: str) -> None:
        async with limiter.slot(urgent=True):
            got.append(name)

    scopes: list[trio.CancelScope] = []

    async def give_up() -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await take("impatient")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(give_up)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "later")
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.waiting == (2, 0)
        scopes[0].cancel()  # the first waiter gives up before a slot is free
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.waiting == (1, 0)
        release.set()
    assert got == ["later"]
    assert limiter.held == 0 and limiter.waiting == (0, 0)
