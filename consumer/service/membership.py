"""Whether this worker is still a member of its consumer group.

aiokafka keeps the member's generation locally and learns that the group dropped it only
from a failed heartbeat (or commit). A worker paused past its session timeout (a zombie)
still holds its old generation when it wakes, and its old assignment with it. Reading the
local state says "still a member" until the next heartbeat says otherwise.

That is enough before most actions, which the broker checks anyway (an offset commit
carries the generation). Starting a transactional producer is not checked: its
``init_transactions`` fences whoever produces under the same transactional id now,
with no regard to the group. So before a worker starts a fresh producer for a partition
it has had for a while, it asks the coordinator (:func:`confirm_membership`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka.structs import TopicPartition

log = logging.getLogger(__name__)


def membership_lost(consumer: Any) -> bool:
    """True when this member knows that the group no longer has it (a session or poll
    timeout, seen by a heartbeat or a commit).

    aiokafka has no on_partitions_lost; it resets the member's generation before calling
    on_partitions_revoked in that case, which is what this reads.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    generation = getattr(coordinator, "generation", None)
    return isinstance(generation, int) and generation < 0


async def confirm_membership(consumer: Any, tp: TopicPartition) -> bool:
    """Ask the group coordinator, with one heartbeat, whether this member is still in the
    group with the generation it holds, and whether it still has ``tp``.

    False when the coordinator says the member or its generation is gone (aiokafka then
    resets the generation and rejoins, as after its own failed heartbeat), and when the
    question could not be asked (no coordinator, the broker away): whoever acts on the
    answer waits and asks again later.
    """
    if membership_lost(consumer) or tp not in consumer.assignment():
        return False
    coordinator = consumer._coordinator
    # aiokafka's own heartbeat: it handles every answer (rebalance, unknown member, a
    # coordinator moved) as the heartbeat routine does, and returns whether it was ok.
    answered_ok = bool(await coordinator._do_heartbeat())
    return answered_ok and not membership_lost(consumer) and tp in consumer.assignment()


class StallGuard:
    """Notices that the worker was stopped for longer than its session timeout (SIGSTOP,
    a VM paused, an event loop stuck), and until the group coordinator confirms it is
    still a member, lets nothing be fetched or sent.

    Such a worker is a zombie: the group gave its partitions to another member meanwhile,
    but its consumer still holds its old generation until the next heartbeat fails (up to
    a heartbeat interval). At-least-once, it would go on fetching from its old position
    and answering, each answer a duplicate of the new owner's. The guard asks at once.
    """

    def __init__(
        self,
        consumer: Any,
        session_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = 0.1,
    ) -> None:
        self._consumer = consumer
        self._session_s = session_timeout_s
        self._clock = clock
        self._tick_s = tick_s
        self._last_tick = clock()
        self._stalled_s: float | None = None
        self._confirming: asyncio.Future[bool] | None = None

    async def run(self) -> None:
        """Tick until cancelled: a tick that comes late by more than the session timeout
        is a stall."""
        while True:
            await asyncio.sleep(self._tick_s)
            self._tick()

    async def cleared(self) -> bool:
        """True when the worker may fetch and send; False when it is no longer a member
        (its partitions are another member's: what it holds is theirs to answer)."""
        self._tick()  # the ticker may not have run since the stall ended
        if membership_lost(self._consumer):
            return False
        if self._stalled_s is None:
            return True
        if self._confirming is None:
            self._confirming = asyncio.ensure_future(self._confirm())
        # shield: one caller being cancelled must not cancel the others' question
        return await asyncio.shield(self._confirming)

    def _tick(self) -> None:
        now = self._clock()
        late = now - self._last_tick
        self._last_tick = now
        if late > self._session_s and self._stalled_s is None:
            self._stalled_s = late

    async def _confirm(self) -> bool:
        log.warning(
            "the worker was stopped longer than its session timeout: nothing is fetched or "
            "sent until the group confirms it still is a member",
            extra={"stalled_s": round(self._stalled_s or 0.0, 1)},
        )
        try:
            async with asyncio.timeout(self._session_s):
                answered_ok = bool(await self._consumer._coordinator._do_heartbeat())
        except TimeoutError:
            answered_ok = False
        finally:
            self._stalled_s = None
            self._confirming = None
        member = answered_ok and not membership_lost(self._consumer)
        log.info(
            "still a member of the group"
            if member
            else "no longer a member of the group; "
            "its partitions' records are left to their new owner"
        )
        return member
