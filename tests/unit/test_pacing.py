"""The late cut's predictions: a batch's device time, the device's end, the lead."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import pytest

from consumer.engine.batcher import TokenBudgetBatcher
from consumer.engine.handoff import BatchQueue
from consumer.engine.pacing import BatchClock, DeviceSchedule, LeadTime
from consumer.engine.work import Batch


def test_the_clock_says_nothing_until_it_has_seen_enough_batches() -> None:
    clock = BatchClock(min_batches=3)
    for _ in range(2):
        clock.observe(1000, 0.005)
        assert clock.predict(1000) is None
    clock.observe(1000, 0.005)
    assert clock.predict(1000) == pytest.approx(0.005)


def test_the_clock_fits_a_fixed_part_and_a_part_per_token() -> None:
    """One-request batches and bigger ones are both predicted: a batch of three requests
    costs less than three of one (the fixed part is paid once)."""
    clock = BatchClock()
    rng = random.Random(1)
    for _ in range(200):
        cost = rng.choice([3000, 6000, 9000])
        clock.observe(cost, 0.0015 + cost * 1.5e-6)
    assert clock.predict(3000) == pytest.approx(0.006)
    assert clock.predict(9000) == pytest.approx(0.015)
    assert clock.predict(12000) == pytest.approx(0.0195)  # beyond the costs seen
    assert clock.error() == pytest.approx(0.0, abs=1e-9)


def test_the_clock_never_scales_a_mean_up_when_costs_barely_vary() -> None:
    """Without spread to fit a line it predicts the mean time: a bigger batch is not
    guessed longer (a guess too long would let the device idle), a smaller one shorter."""
    clock = BatchClock()
    for _ in range(20):
        clock.observe(1000, 0.010)
    assert clock.predict(2000) == pytest.approx(0.010)
    assert clock.predict(500) == pytest.approx(0.005)


def test_the_clock_follows_a_change_of_pace_and_reports_its_error() -> None:
    clock = BatchClock(half_life=16)
    rng = random.Random(2)
    for _ in range(100):
        clock.observe(4000, 0.006 + rng.uniform(-0.0005, 0.0005))
    assert clock.predict(4000) == pytest.approx(0.006, abs=0.0003)
    assert 0.0001 < clock.error() < 0.001
    for _ in range(200):  # the device got twice as slow
        clock.observe(4000, 0.012)
    assert clock.predict(4000) == pytest.approx(0.012, abs=0.0003)


def test_nonsense_is_not_learnt() -> None:
    clock = BatchClock(min_batches=1)
    clock.observe(1000, -1.0)
    assert clock.batches == 0 and clock.predict(1000) is None
    with pytest.raises(ValueError):
        BatchClock(half_life=0)


def taught_clock(seconds_per_token: float) -> BatchClock:
    clock = BatchClock(min_batches=1)
    clock.observe(1000, 1000 * seconds_per_token)
    clock.observe(2000, 2000 * seconds_per_token)
    return clock


def test_the_schedule_adds_up_the_batches_queued_on_the_device() -> None:
    schedule = DeviceSchedule(taught_clock(1e-5))  # 10 ms a 1,000-token batch
    first, second = object(), object()
    assert schedule.free_at() is None  # nothing on the device
    schedule.launched(first, 1000, at=100.0)
    assert schedule.free_at() == pytest.approx(100.010)
    schedule.launched(second, 2000, at=100.002)  # queued behind the first
    assert schedule.free_at() == pytest.approx(100.030)
    # the first ended late: the second starts then, and the clock learns the first's time
    schedule.settled(first, at=100.012, measured=True)
    assert schedule.free_at() == pytest.approx(100.032)
    assert len(schedule) == 1 and schedule.clock.batches == 3
    schedule.settled(second, at=100.033, measured=True)
    assert schedule.free_at() is None and len(schedule) == 0


def test_a_batch_launched_on_an_idle_device_counts_from_its_launch() -> None:
    clock = taught_clock(1e-5)
    schedule = DeviceSchedule(clock)
    earlier, later = object(), object()
    schedule.launched(earlier, 1000, at=1.0)
    schedule.settled(earlier, at=1.01, measured=True)
    schedule.launched(later, 1000, at=5.0)  # the device idled in between
    assert schedule.free_at() == pytest.approx(5.01)
    schedule.settled(later, at=5.02, measured=True)
    assert clock.batches == 4  # 10 ms and 20 ms learnt, not the idle 4 s


def test_a_failed_batch_teaches_the_clock_nothing() -> None:
    clock = taught_clock(1e-5)
    schedule = DeviceSchedule(clock)
    batch = object()
    schedule.launched(batch, 1000, at=1.0)
    schedule.settled(batch, at=3.0, measured=False)
    assert clock.batches == 2
    schedule.settled(object(), at=4.0, measured=True)  # never launched: ignored
    assert clock.batches == 2


def test_the_schedule_cannot_tell_before_the_clock_can() -> None:
    schedule = DeviceSchedule(BatchClock(min_batches=5))
    schedule.launched(object(), 1000, at=0.0)
    assert schedule.free_at() is None


def test_the_lead_is_a_high_quantile_of_the_recent_ones() -> None:
    lead = LeadTime(samples=10, quantile=0.9)
    assert lead.seconds() == 0.0
    for _ in range(9):
        lead.add(0.001)
    lead.add(0.050)  # one slow batch (a collection, a cold core)
    assert lead.seconds() == 0.050
    for _ in range(10):  # forgotten once it leaves the window
        lead.add(0.002)
    assert lead.seconds() == 0.002


@dataclass(eq=False)
class Item:
    """A queued pair as the batch queue reads it."""

    tokens: int
    deadline: float | None = None
    enqueued: float = field(default_factory=time.perf_counter)


def busy_queue(late_cut: bool, device_s: float) -> tuple[BatchQueue, float]:
    """A queue whose device holds one batch due to take ``device_s`` (the clock taught);
    returns it and when that batch went to the device."""
    queue = BatchQueue(
        TokenBudgetBatcher(max_batch_tokens=10_000), 0.0, late_cut, late_cut_margin_s=0.01
    )
    for _ in range(8):
        queue._schedule.clock.observe(100, device_s)
    queue.offer(Batch([], cost=100))
    assert queue.take(None) is not None
    return queue, time.perf_counter()


def cut_in_thread(queue: BatchQueue) -> tuple[threading.Thread, list[float]]:
    cut_at: list[float] = []

    def cut() -> None:
        assert queue.cut() is not None
        cut_at.append(time.perf_counter())

    thread = threading.Thread(target=cut)
    thread.start()
    return thread, cut_at


def test_the_queue_cuts_just_before_the_device_is_due_and_learns_how_late_it_woke() -> None:
    queue, launched = busy_queue(late_cut=True, device_s=0.3)
    queue.tokenizing(+1)  # each request is counted as tokenizing until it is queued
    queue.enqueue([Item(10)])
    thread, cut_at = cut_in_thread(queue)
    time.sleep(0.1)
    queue.tokenizing(+1)
    queue.enqueue([Item(20)])  # comes while the cut waits: joins the same batch
    thread.join(5)
    assert cut_at and cut_at[0] - launched >= 0.3 - 0.01 - 0.02  # the margin, and slack
    assert len(queue._batcher) == 0  # both pairs went into the one batch cut
    assert queue._wake.seconds() >= 0 and len(queue._wake._samples) == 1


def test_without_late_cut_the_queue_cuts_at_once() -> None:
    queue, launched = busy_queue(late_cut=False, device_s=0.3)
    queue.tokenizing(+1)
    queue.enqueue([Item(10)])
    thread, cut_at = cut_in_thread(queue)
    thread.join(5)
    assert cut_at and cut_at[0] - launched < 0.2
    assert len(queue._wake._samples) == 0
