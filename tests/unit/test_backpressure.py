"""The pair gate pauses above the high mark and resumes at the low mark, once each."""

from __future__ import annotations

import pytest

from consumer.service.backpressure import FlowChange, PairGate


def test_pause_above_high_and_resume_at_low_with_no_flapping_between() -> None:
    gate = PairGate(high=10, low=4)
    gate.add(10)
    assert gate.change() is None, "at the mark is not above it"
    assert gate.room == 0
    gate.add(1)
    assert gate.change() is FlowChange.PAUSE
    assert gate.paused
    assert gate.change() is None, "a change is reported once"
    gate.remove(6)  # 5 left: between the marks, still paused
    assert gate.change() is None
    assert gate.paused
    gate.remove(1)
    assert gate.change() is FlowChange.RESUME
    assert not gate.paused
    assert gate.room == 6
    gate.add(3)
    assert gate.change() is None


def test_removing_more_than_added_is_a_bug() -> None:
    gate = PairGate(high=2, low=1)
    gate.add(1)
    with pytest.raises(ValueError):
        gate.remove(2)


@pytest.mark.parametrize(("high", "low"), [(0, 0), (5, 5), (5, -1), (5, 6)])
def test_marks_must_be_ordered(high: int, low: int) -> None:
    with pytest.raises(ValueError):
        PairGate(high=high, low=low)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def serve(gate: PairGate, clock: Clock, pairs_per_s: float, seconds: float) -> None:
    """Keep 100 pairs in flight, answering ``pairs_per_s`` for ``seconds``."""
    step = 0.1
    for _ in range(round(seconds / step)):
        gate.add(round(pairs_per_s * step))
        clock.now += step
        gate.remove(round(pairs_per_s * step))


def test_the_high_mark_holds_target_seconds_of_work_at_the_measured_rate() -> None:
    clock = Clock()
    gate = PairGate(high=4096, low=2048, target_s=2.5, min_pairs=64, clock=clock)
    gate.add(100)  # a backlog, so the worker is busy throughout
    assert gate.high == 64, "the smallest window until a rate is measured"
    serve(gate, clock, pairs_per_s=200, seconds=30)
    assert gate.high == pytest.approx(500, rel=0.02)  # 200 pairs/s x 2.5 s
    assert gate.low == gate.high // 2  # the configured ratio
    assert gate.room == gate.high - 100
    serve(gate, clock, pairs_per_s=4000, seconds=60)
    assert gate.high == 4096, "never above the configured high mark"
    assert gate.low == 2048
    serve(gate, clock, pairs_per_s=10, seconds=60)
    assert gate.high == 64, "never below min_pairs"


def test_idle_time_and_given_up_pairs_do_not_lower_the_rate() -> None:
    clock = Clock()
    gate = PairGate(high=4096, low=2048, target_s=1.0, min_pairs=1, clock=clock)
    gate.add(50)
    serve(gate, clock, pairs_per_s=300, seconds=20)
    measured = gate.high
    gate.remove(50)  # answered: the worker is idle now
    clock.now += 600.0  # ten idle minutes
    gate.add(10)
    gate.remove(10, answered=False)  # given up (a rebalance): not a rate
    assert gate.high == pytest.approx(measured, rel=0.05)


def test_the_window_pauses_at_its_own_mark_not_the_configured_one() -> None:
    clock = Clock()
    gate = PairGate(high=4096, low=2048, target_s=2.0, min_pairs=10, clock=clock)
    gate.add(20)
    serve(gate, clock, pairs_per_s=50, seconds=30)  # window: 100 pairs
    gate.add(81)
    assert gate.change() is FlowChange.PAUSE  # 101 in flight, above 100
    gate.remove(51)
    assert gate.change() is FlowChange.RESUME  # 50: the low mark (half)


def test_target_zero_keeps_the_fixed_marks() -> None:
    clock = Clock()
    gate = PairGate(high=300, low=100, target_s=0.0, min_pairs=10, clock=clock)
    gate.add(5)
    serve(gate, clock, pairs_per_s=20, seconds=30)
    assert (gate.high, gate.low) == (300, 100)


@pytest.mark.parametrize(("target_s", "min_pairs"), [(-1.0, 1), (1.0, 0)])
def test_the_window_settings_must_make_sense(target_s: float, min_pairs: int) -> None:
    with pytest.raises(ValueError):
        PairGate(high=10, low=5, target_s=target_s, min_pairs=min_pairs)
