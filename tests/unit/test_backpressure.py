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
