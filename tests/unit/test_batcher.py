"""Token-budget batch formation: budget, completeness, fairness, deadlines."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from consumer.engine.batcher import (
    FormedBatch,
    TokenBudgetBatcher,
    longest_times_count,
)


def total_tokens(items: Sequence[Pair]) -> int:
    """The cost of a packed (padding-free) batch, as the packed scorer counts it."""
    return sum(item.tokens for item in items)


_ids = itertools.count()


@dataclass(eq=False)
class Pair:
    tokens: int
    deadline: float | None = None
    uid: int = field(default_factory=lambda: next(_ids))


def drain_batches(batcher: TokenBudgetBatcher[Pair], now: float = 0.0) -> list[FormedBatch[Pair]]:
    batches = []
    while len(batcher):
        batches.append(batcher.next_batch(now))
    return batches


@pytest.mark.parametrize("seed", range(30))
def test_budget_respected_and_no_pair_lost_or_duplicated(seed: int) -> None:
    rng = random.Random(seed)
    budget = rng.choice([512, 2048, 8192, 65536])
    max_pairs = rng.choice([1, 3, 16, 512])
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(
        max_batch_tokens=budget, max_batch_pairs=max_pairs, window_pairs=rng.choice([1, 64, 4096])
    )
    # A mix of short, long and over-budget pairs.
    pairs = [
        Pair(rng.choice([rng.randint(1, 64), rng.randint(40, 600), rng.randint(1, 3 * budget)]))
        for _ in range(rng.randint(1, 400))
    ]
    batcher.add_many(pairs)

    served: list[Pair] = []
    for formed in drain_batches(batcher):
        assert formed.items, "a non-empty queue always yields a batch"
        assert len(formed.items) <= max_pairs
        assert formed.cost == longest_times_count(formed.items)
        if len(formed.items) > 1:
            assert formed.cost <= budget
        assert [p.tokens for p in formed.items] == sorted(p.tokens for p in formed.items)
        served.extend(formed.items)

    assert sorted(p.uid for p in served) == sorted(p.uid for p in pairs)
    assert batcher.pending_tokens == 0


def test_batch_grows_until_the_next_pair_would_break_the_budget() -> None:
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(max_batch_tokens=1000)
    batcher.add_many(Pair(100) for _ in range(25))
    formed = batcher.next_batch(0.0)
    # 10 pairs of 100 cost exactly 1000; an 11th would cost 1100.
    assert len(formed.items) == 10
    assert formed.cost == 1000


def test_oversized_pair_goes_alone() -> None:
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(max_batch_tokens=100)
    big = Pair(5000)
    batcher.add_many([big, Pair(10), Pair(10)])
    first = batcher.next_batch(0.0)
    assert first.items == [big]
    assert first.cost == 5000
    assert len(batcher.next_batch(0.0).items) == 2


def test_oldest_pair_is_in_every_next_batch_despite_a_stream_of_short_pairs() -> None:
    rng = random.Random(7)
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(max_batch_tokens=4096, window_pairs=64)
    long_pair = Pair(2000)
    batcher.add(long_pair)
    for step in range(50):
        batcher.add_many(Pair(rng.randint(5, 30)) for _ in range(100))
        oldest = batcher.oldest()
        formed = batcher.next_batch(0.0)
        assert oldest in formed.items
        if step == 0:
            assert long_pair in formed.items


@pytest.mark.parametrize("seed", range(10))
def test_every_pair_served_within_a_bound_of_batches(seed: int) -> None:
    """A pair with k live pairs ahead of it is served within k + 1 batches."""
    rng = random.Random(seed)
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(
        max_batch_tokens=rng.choice([1024, 8192]), max_batch_pairs=64, window_pairs=128
    )
    bound: dict[int, int] = {}
    batches_since: dict[int, int] = {}
    for _ in range(300):
        for _ in range(rng.randint(0, 20)):
            pair = Pair(rng.randint(1, 900))
            bound[pair.uid] = len(batcher) + 1
            batches_since[pair.uid] = 0
            batcher.add(pair)
        if not len(batcher):
            continue
        formed = batcher.next_batch(0.0)
        for uid in batches_since:
            batches_since[uid] += 1
        for pair in formed.items:
            assert batches_since.pop(pair.uid) <= bound[pair.uid]
    for formed in drain_batches(batcher):
        for uid in batches_since:
            batches_since[uid] += 1
        for pair in formed.items:
            assert batches_since.pop(pair.uid) <= bound[pair.uid]
    assert not batches_since


def test_batch_is_made_of_length_neighbours_of_the_oldest_pair() -> None:
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(max_batch_tokens=4 * 305)
    anchor = Pair(300)
    batcher.add(anchor)
    batcher.add_many(Pair(t) for t in (10, 20, 290, 295, 305, 900, 1000))
    formed = batcher.next_batch(0.0)
    # 4 pairs padded to 305 fit; the nearest lengths are taken, not the shortest.
    assert [p.tokens for p in formed.items] == [290, 295, 300, 305]
    assert anchor in formed.items


def test_expired_pairs_are_skipped_and_returned() -> None:
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(max_batch_tokens=10_000)
    gone = [Pair(50, deadline=99.0), Pair(60, deadline=100.0)]
    live = [Pair(50, deadline=101.0), Pair(70)]
    batcher.add_many([gone[0], live[0], gone[1], live[1]])
    formed = batcher.next_batch(100.0)
    assert set(map(id, formed.expired)) == set(map(id, gone))
    assert set(map(id, formed.items)) == set(map(id, live))
    assert len(batcher) == 0
    assert batcher.pending_tokens == 0


def test_only_expired_pairs_give_an_empty_batch() -> None:
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher()
    batcher.add(Pair(5, deadline=1.0))
    formed = batcher.next_batch(2.0)
    assert formed.items == []
    assert len(formed.expired) == 1
    assert formed.cost == 0


def test_remove_and_drain() -> None:
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher()
    a, b, c = Pair(1), Pair(2), Pair(3)
    batcher.add_many([a, b, c])
    assert batcher.remove(b)
    assert not batcher.remove(b)
    assert batcher.pending_tokens == 4
    assert batcher.drain() == [a, c]
    assert len(batcher) == 0
    batcher.add(a)
    with pytest.raises(ValueError, match="already queued"):
        batcher.add(a)


def test_packed_cost_fills_by_real_tokens() -> None:
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(max_batch_tokens=1000, cost=total_tokens)
    batcher.add_many([Pair(500), Pair(10), Pair(10), Pair(490)])
    formed = batcher.next_batch(0.0)
    assert formed.cost <= 1000
    assert sorted(p.tokens for p in formed.items) == [10, 490, 500]


def test_lowered_budget_applies_to_the_next_batch() -> None:
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(max_batch_tokens=1000)
    batcher.add_many(Pair(100) for _ in range(20))
    batcher.max_batch_tokens = 500
    assert len(batcher.next_batch(0.0).items) == 5
    with pytest.raises(ValueError):
        batcher.max_batch_tokens = 0


def test_would_fill_batch() -> None:
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(max_batch_tokens=100, max_batch_pairs=3)
    batcher.add(Pair(10))
    assert not batcher.would_fill_batch()
    batcher.add(Pair(95))
    assert batcher.would_fill_batch()


def packed_batcher(quick: int, backlog: float = 4.0) -> TokenBudgetBatcher[Pair]:
    batcher: TokenBudgetBatcher[Pair] = TokenBudgetBatcher(
        max_batch_tokens=65536, cost=total_tokens, by_length=False, quick_backlog=backlog
    )
    batcher.quick_batch_cost = quick
    return batcher


def test_a_small_backlog_is_cut_into_quick_batches() -> None:
    batcher = packed_batcher(quick=8192)
    batcher.add_many(Pair(368) for _ in range(40))  # 14,720 tokens: under 4 quick batches
    sizes = [formed.cost for formed in drain_batches(batcher)]
    assert all(size <= 8192 for size in sizes)
    assert sum(sizes) == 40 * 368


def test_a_large_backlog_gets_the_full_budget_until_it_is_small() -> None:
    batcher = packed_batcher(quick=8192)
    batcher.add_many(Pair(368) for _ in range(300))  # 110,400 tokens: over 4 quick batches
    first = batcher.next_batch(0.0)
    assert first.cost > 8192
    assert first.cost <= 65536
    # 300 - 178 pairs left = 44,896 tokens: still over 32,768, so full again, then quick
    costs = [formed.cost for formed in drain_batches(batcher)]
    assert costs[0] > 8192
    assert all(cost <= 8192 for cost in costs[1:])


def test_quick_batches_are_off_without_a_quick_size_or_backlog() -> None:
    for batcher in (packed_batcher(quick=0), packed_batcher(quick=8192, backlog=0)):
        batcher.add_many(Pair(368) for _ in range(40))
        assert batcher.next_batch(0.0).cost == 40 * 368


def test_a_full_quick_batch_needs_no_wait_for_more() -> None:
    batcher = packed_batcher(quick=8192)
    batcher.add_many(Pair(368) for _ in range(20))  # 7,360 tokens
    assert not batcher.would_fill_batch()
    batcher.add(Pair(1000))
    assert batcher.would_fill_batch()


def test_the_quick_size_never_raises_a_lowered_budget() -> None:
    batcher = packed_batcher(quick=8192)
    batcher.max_batch_tokens = 4096  # after an out-of-memory
    batcher.add_many(Pair(368) for _ in range(20))
    assert batcher.next_batch(0.0).cost <= 4096
