"""Partitions coming and going: set-up on assignment, the last commit on revoke.

On assignment each partition gets fresh work (:class:`PartitionWork`) with its committed
head; the delivery mode gets ready for it first (exactly-once starts its producers), and a
partition whose last owner left a record unfinished is worked carefully
(:mod:`consumer.service.careful`). A partition is published to the fetch loop only once
all of that is set.

On revoke the worker waits (bounded) for the revoked partitions' in-flight requests,
commits what is done, cancels the rest (the new owner gets them again). When membership
was lost (session expired, poll interval exceeded) it commits nothing: another member may
own the partitions already, and a commit could move its offsets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from aiokafka import ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from consumer.service.careful import CarefulStart
from consumer.service.commit_policy import names
from consumer.service.delivery_mode import DeliveryMode
from consumer.service.intake import Intake, cancel_all, uncount_attempts
from consumer.service.oldest_first import Lookahead
from consumer.service.partitions import PartitionWork

log = logging.getLogger(__name__)

_REVOKE_POLL_S = 0.01


class Rebalance(ConsumerRebalanceListener):
    """The worker's rebalance listener; :attr:`in_group` says whether it has a current
    assignment."""

    def __init__(
        self,
        mode: DeliveryMode,
        partitions: dict[TopicPartition, PartitionWork],
        intake: Intake,
        careful: CarefulStart,
        lookahead: Lookahead,
        forget_lag: Callable[[Iterable[TopicPartition]], None],
        membership_lost: Callable[[], bool],
        revoke_timeout_s: float,
    ) -> None:
        self._mode = mode
        self._partitions = partitions
        self._intake = intake
        self._careful = careful
        self._lookahead = lookahead
        self._forget_lag = forget_lag
        self._membership_lost = membership_lost
        self._revoke_timeout_s = revoke_timeout_s
        self.in_group = False

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        partitions = set(assigned)
        try:
            await self.set_up(partitions)
        except Exception:
            # aiokafka logs a failing listener and carries on: the partitions would stay
            # assigned with no work set up, their records fetched again and again and
            # never answered. Work them without the last owner's attempt counts instead.
            log.exception(
                "setting up assigned partitions failed; working them without the attempt "
                "counts of their last owner",
                extra={"partitions": names(partitions)},
            )
            self._set_up_plainly(partitions)
        self.in_group = True
        self._intake.resumed.set()
        self._intake.apply_flow()
        log.info("partitions assigned", extra={"partitions": names(partitions)})

    async def set_up(self, assigned: set[TopicPartition]) -> None:
        """Work for each of ``assigned``, published once its careful state is set."""
        heads = await self._mode.set_up(assigned)
        work = {tp: PartitionWork(heads.get(tp)) for tp in assigned}
        try:
            await self._careful.begin({tp: w for tp, w in work.items() if w.suspect})
        finally:
            # Published only now: the fetch loop works a partition's records once it is
            # in the partitions, and a suspect one must be worked carefully from its first.
            self._partitions.update(work)

    def _set_up_plainly(self, assigned: set[TopicPartition]) -> None:
        """What a failed :meth:`set_up` left out: work with no head, and whatever the
        delivery mode needs without asking the broker."""
        for tp in assigned:
            self._partitions.setdefault(tp, PartitionWork(None))
        self._mode.set_up_plainly(assigned)

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        partitions = set(revoked)
        self.in_group = False
        if not partitions:  # the first join, or a member that had no partitions
            return
        work = {tp: self._partitions.pop(tp) for tp in partitions if tp in self._partitions}
        self._lookahead.drop(partitions)
        self._careful.forget(partitions)
        if self._membership_lost():
            log.warning("partitions lost", extra={"partitions": names(partitions)})
            await cancel_all({t for w in work.values() for t in w.tasks})
            await self._let_go(partitions)
            return
        deadline = time.monotonic() + self._revoke_timeout_s
        while any(w.tasks for w in work.values()) and time.monotonic() < deadline:
            await asyncio.sleep(_REVOKE_POLL_S)
        abandoned = {t for w in work.values() for t in w.tasks}
        await self._mode.committer.commit(work)
        await uncount_attempts(self._mode.committer, work)
        await cancel_all(abandoned)
        await self._let_go(partitions)
        log.info(
            "partitions revoked",
            extra={"partitions": names(partitions), "abandoned_requests": len(abandoned)},
        )

    async def _let_go(self, partitions: set[TopicPartition]) -> None:
        await self._mode.revoked(partitions)
        self._forget_lag(partitions)
