"""The commit point of a partition never passes a record that is still in flight."""

from __future__ import annotations

import random

import pytest

from consumer.service.offsets import PartitionOffsets


def test_nothing_committable_before_anything_finishes() -> None:
    offsets = PartitionOffsets()
    assert offsets.committable is None
    offsets.register(10)
    offsets.register(11)
    assert offsets.committable is None
    assert offsets.in_flight == 2
    assert not offsets.idle


def test_in_order_completion_moves_the_commit_point_one_by_one() -> None:
    offsets = PartitionOffsets()
    for offset in range(5):
        offsets.register(offset)
    for offset in range(5):
        offsets.done(offset)
        assert offsets.committable == offset + 1
    assert offsets.idle


def test_a_finished_record_behind_an_unfinished_one_is_not_committed() -> None:
    offsets = PartitionOffsets()
    for offset in (0, 1, 2):
        offsets.register(offset)
    offsets.done(2)
    offsets.done(1)
    assert offsets.committable is None
    offsets.done(0)
    assert offsets.committable == 3


def test_gaps_between_registered_offsets_are_skipped() -> None:
    # Compacted topics and transaction markers leave offsets that are never fetched.
    offsets = PartitionOffsets()
    for offset in (4, 7, 9):
        offsets.register(offset)
    offsets.done(7)
    assert offsets.committable is None
    offsets.done(4)
    assert offsets.committable == 8
    offsets.done(9)
    assert offsets.committable == 10


def test_registering_out_of_order_is_refused() -> None:
    offsets = PartitionOffsets()
    offsets.register(5)
    with pytest.raises(ValueError, match="fetch order"):
        offsets.register(5)
    with pytest.raises(ValueError, match="fetch order"):
        offsets.register(3)


@pytest.mark.parametrize("offset", [0, 2, 99])
def test_finishing_an_offset_that_is_not_in_flight_is_refused(offset: int) -> None:
    offsets = PartitionOffsets()
    offsets.register(1)
    offsets.register(3)
    with pytest.raises(ValueError, match="not in flight"):
        offsets.done(offset)


def test_finishing_twice_is_refused() -> None:
    offsets = PartitionOffsets()
    offsets.register(1)
    offsets.register(2)
    offsets.done(2)
    with pytest.raises(ValueError, match="not in flight"):
        offsets.done(2)
    offsets.done(1)
    with pytest.raises(ValueError, match="not in flight"):
        offsets.done(1)


def test_uncommitted_is_only_reported_once_per_commit_point() -> None:
    offsets = PartitionOffsets()
    offsets.register(0)
    offsets.register(1)
    assert offsets.uncommitted is None
    offsets.done(0)
    assert offsets.uncommitted == 1
    offsets.mark_committed(1)
    assert offsets.uncommitted is None
    offsets.done(1)
    assert offsets.uncommitted == 2
    offsets.mark_committed(2)
    offsets.mark_committed(1)  # a late, older commit does not move the mark back
    assert offsets.uncommitted is None


def _expected_commit_point(registered: list[int], finished: set[int]) -> int | None:
    """The reference answer, by brute force: one past the finished prefix."""
    point = None
    for offset in registered:
        if offset not in finished:
            break
        point = offset + 1
    return point


@pytest.mark.parametrize("seed", range(30))
def test_random_completion_orders_never_commit_past_unfinished_work(seed: int) -> None:
    rng = random.Random(seed)
    offsets = PartitionOffsets()
    registered: list[int] = []
    finished: set[int] = set()
    unfinished: list[int] = []
    next_offset = rng.randrange(0, 1000)
    best_so_far: int | None = None
    for _ in range(400):
        # Interleave fetching (with occasional gaps) and finishing in random order.
        if not unfinished or rng.random() < 0.5:
            next_offset += 1 + (rng.randrange(3) if rng.random() < 0.1 else 0)
            offsets.register(next_offset)
            registered.append(next_offset)
            unfinished.append(next_offset)
        else:
            offset = unfinished.pop(rng.randrange(len(unfinished)))
            offsets.done(offset)
            finished.add(offset)
        point = offsets.committable
        assert point == _expected_commit_point(registered, finished)
        if point is not None:
            assert all(o in finished for o in registered if o < point)
            assert best_so_far is None or point >= best_so_far
            best_so_far = point
        assert offsets.in_flight == len(unfinished)
    for offset in unfinished:
        offsets.done(offset)
    assert offsets.committable == registered[-1] + 1
    assert offsets.idle
