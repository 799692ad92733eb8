"""Read-plan bookkeeping in backupfs.readpath.plans: planned bytes per block, cursors,
hints; checked against a plain per-byte model where the arithmetic matters."""

import random

from hypothesis import given
from hypothesis import strategies as st

from backupfs.readpath.plans import PlanBook, PlanCursor
from backupfs.store.image import Image

BS = 1000


def make_image(size_bytes: int = 10 * BS, image_id: int = 1, block_size: int = BS) -> Image:
    return Image(
        image_id=image_id,
        url=f"http://store.invalid/{image_id}.img",
        size_bytes=size_bytes,
        block_size=block_size,
        digest_block_size=block_size,
    )


def test_a_new_book_is_inactive_and_covers_nothing() -> None:
    book = PlanBook(hinted_blocks=16)
    image = make_image()
    assert not book.active
    assert not book.covers(image, [0])
    assert book.consume(image, 0, 10 * BS) == []


def test_a_block_leaves_the_plan_once_all_its_planned_bytes_were_served() -> None:
    book = PlanBook(hinted_blocks=16)
    image = make_image()
    cursor = PlanCursor()
    book.add(image, 500, 2500, cursor, position=2000)  # 500 of block 0, all of 1, 500 of 2
    assert book.active
    assert book.covers(image, [0, 1, 2])
    assert not book.covers(image, [2, 3])
    assert book.consume(image, 500, 700) == []  # 300 of block 0's 500 planned bytes left
    assert cursor.position == 2000
    assert book.consume(image, 700, 1000) == [(1, 0)]
    assert not book.covers(image, [0])
    # Bytes outside the plan count too: a read of the whole of block 2 serves its 500.
    assert book.consume(image, 1000, 3000) == [(1, 1), (1, 2)]
    assert not book.active


def test_a_block_planned_twice_needs_both_ranges_served() -> None:
    book = PlanBook(hinted_blocks=16)
    image = make_image()
    first, second = PlanCursor(), PlanCursor()
    book.add(image, 0, 300, first, position=300)
    book.add(image, 600, 900, second, position=900)
    assert book.consume(image, 0, 300) == []
    assert first.position == 300 and second.position == 0  # the block keeps its first plan
    assert book.consume(image, 600, 900) == [(1, 0)]


def test_the_short_last_block_counts_only_its_bytes() -> None:
    book = PlanBook(hinted_blocks=16)
    image = make_image(size_bytes=2 * BS + 10)
    cursor = PlanCursor()
    book.add(image, BS, 5 * BS, cursor, position=4 * BS)  # clipped to the image
    assert book.covers(image, [1, 2])
    assert book.consume(image, 2 * BS, 2 * BS + 10) == [(1, 2)]
    assert book.consume(image, BS, 2 * BS) == [(1, 1)]


def test_cursor_moves_forward_only_and_wakes_its_waiters() -> None:
    book = PlanBook(hinted_blocks=16)
    image = make_image()
    cursor = PlanCursor()
    book.add(image, 0, BS, cursor, position=BS)
    book.add(image, BS, 2 * BS, cursor, position=2 * BS)
    moved = cursor.moved
    book.consume(image, BS, BS + 1)
    assert cursor.position == 2 * BS and moved.is_set() and cursor.moved is not moved
    moved = cursor.moved
    book.consume(image, 0, 1)  # a later read of an earlier block: no step back
    assert cursor.position == 2 * BS and not moved.is_set()


def test_forget_drops_only_that_plans_blocks() -> None:
    book = PlanBook(hinted_blocks=16)
    image = make_image()
    ended, running = PlanCursor(), PlanCursor()
    book.add(image, 0, 2 * BS, ended, position=2 * BS)
    book.add(image, 5 * BS, 6 * BS, running, position=BS)
    book.forget(ended)
    assert not book.covers(image, [0]) and not book.covers(image, [1])
    assert book.covers(image, [5])
    assert book.consume(image, 0, 2 * BS) == []
    book.forget(running)
    assert not book.active


def test_hints_are_per_image_and_bounded() -> None:
    book = PlanBook(hinted_blocks=3)
    image, other = make_image(), make_image(image_id=2)
    book.hint(image, range(3))
    assert book.active
    assert book.covers(image, range(3))
    assert not book.covers(other, [0])
    assert book.consume(image, 0, 3 * BS) == []  # hints are not planned bytes
    book.hint(other, [0])  # the oldest hint goes
    assert not book.covers(image, [0])
    assert book.covers(image, [1, 2]) and book.covers(other, [0])


def test_covers_mixes_planned_and_hinted_blocks() -> None:
    book = PlanBook(hinted_blocks=16)
    image = make_image()
    book.hint(image, [0])
    book.add(image, BS, 2 * BS, PlanCursor(), position=BS)
    assert book.covers(image, range(2))
    assert not book.covers(image, range(3))


@given(
    size_bytes=st.integers(1, 8 * BS),
    cuts=st.lists(st.integers(0, 8 * BS), max_size=12),
    seed=st.integers(0, 2**32),
)
def test_every_planned_block_is_released_when_its_last_planned_byte_is_served(
    size_bytes: int, cuts: list[int], seed: int
) -> None:
    """Plan disjoint ranges, serve the planned bytes in random pieces and order: a block
    comes back exactly when the model says its last planned byte was served."""
    image = make_image(size_bytes)
    bounds = sorted({0, size_bytes, *(c for c in cuts if c < size_bytes)})
    ranges = list(zip(bounds, bounds[1:], strict=False))
    rng = random.Random(seed)
    planned = [r for r in ranges if rng.random() < 0.7]
    book = PlanBook(hinted_blocks=16)
    cursor = PlanCursor()
    left: dict[int, int] = {}  # the model: planned bytes per block not served yet
    first_position: dict[int, int] = {}  # plan position of each block's first range
    position = 0
    for start, end in planned:
        position += end - start
        book.add(image, start, end, cursor, position)
        for byte in range(start, end):
            left[byte // BS] = left.get(byte // BS, 0) + 1
            first_position.setdefault(byte // BS, position)
    pieces = [(s, e) for s, e in planned for s, e in _split(s, e, rng)]
    rng.shuffle(pieces)
    released: list[tuple[int, int]] = []
    for start, end in pieces:
        got = book.consume(image, start, end)
        for byte in range(start, end):
            left[byte // BS] -= 1
        assert got == [(1, n) for n in sorted({b // BS for b in range(start, end)}) if not left[n]]
        released += got
    assert sorted(released) == [(1, n) for n in sorted(left)]
    assert not book.active
    assert cursor.position == max(first_position.values(), default=0)


def _split(start: int, end: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted({start, end, *(rng.randrange(start, end) for _ in range(2))})
    return list(zip(cuts, cuts[1:], strict=False))
