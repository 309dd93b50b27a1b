"""After a stall longer than its session, a worker asks the group before it goes on.

A worker SIGSTOP'd past its session (a zombie) woke up still holding its old
generation, went on fetching from its old partitions for up to a heartbeat interval and
answered them: one short chaos run had 162 duplicates of 376 requests. The consumer here
is a fake of the two things the guard reads (its generation, one heartbeat).
"""

from __future__ import annotations

import asyncio

import pytest

from consumer.service.membership import StallGuard


class Coordinator:
    def __init__(self, member: bool) -> None:
        self.generation = 7
        self.member = member
        self.heartbeats = 0

    async def _do_heartbeat(self) -> bool:
        self.heartbeats += 1
        await asyncio.sleep(0.01)
        if not self.member:
            self.generation = -1  # what aiokafka does when the group no longer knows it
        return self.member


class Consumer:
    def __init__(self, member: bool) -> None:
        self._coordinator = Coordinator(member)


def guard_after(stall_s: float, consumer: Consumer) -> StallGuard:
    now = [0.0]
    guard = StallGuard(consumer, session_timeout_s=10.0, clock=lambda: now[0])
    now[0] = stall_s
    return guard


async def test_no_stall_asks_nothing() -> None:
    consumer = Consumer(member=True)
    assert await guard_after(0.5, consumer).cleared()
    assert consumer._coordinator.heartbeats == 0


@pytest.mark.parametrize("member", [True, False])
async def test_after_a_stall_the_group_is_asked_once_and_its_answer_holds(member: bool) -> None:
    consumer = Consumer(member=member)
    guard = guard_after(13.0, consumer)
    answers = await asyncio.gather(*(guard.cleared() for _ in range(20)))
    assert answers == [member] * 20
    assert consumer._coordinator.heartbeats == 1
    # no longer a member: nothing more is sent until the group has it again
    assert await guard.cleared() is member
