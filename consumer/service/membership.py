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

from typing import Any

from aiokafka.structs import TopicPartition


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
