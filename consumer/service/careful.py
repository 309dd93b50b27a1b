"""The careful start after a crash, as one object the fetch loop asks.

A partition whose last owner started the record at the committed position and never
got past it (it died, or left mid-record: :mod:`consumer.service.attempts`) is a
*suspect*. While any assigned partition is one, the worker works carefully: one record at
a time across all its partitions, each one's attempt committed before it runs, until the
commit point of every suspect has passed what its last owner may have had in flight (what
existed then, at most a full in-flight window). A crash in careful mode is the fault of
the one record in flight; a record started ``max_attempts`` times is poison.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from consumer.service.commit_policy import names
from consumer.service.partitions import PartitionWork

log = logging.getLogger(__name__)

_END_OFFSETS_TIMEOUT_S = 10.0

EndOffsetsFn = Callable[[list[TopicPartition]], Awaitable[Mapping[TopicPartition, int]]]


@dataclass(frozen=True, slots=True)
class Step:
    """What to do with one record before it runs.

    ``poison_attempts``: the record was started that many times; dead-letter it.
    ``count_attempt``: commit this attempt count at the record's offset first.
    Neither: run it as is.
    """

    poison_attempts: int | None = None
    count_attempt: int | None = None


class CarefulStart:
    """The suspect partitions, and what working carefully allows."""

    def __init__(self, max_attempts: int, window: int, end_offsets: EndOffsetsFn) -> None:
        """``window``: the most records a last owner can have had in flight past its head.
        ``end_offsets``: partitions' end offsets, from a client no fetch holds up."""
        self._max_attempts = max_attempts
        self._window = window
        self._end_offsets = end_offsets
        self._suspects: set[TopicPartition] = set()

    @property
    def active(self) -> bool:
        """True while working carefully."""
        return bool(self._suspects)

    @property
    def suspects(self) -> frozenset[TopicPartition]:
        """The partitions not yet past what their last owners left unfinished."""
        return frozenset(self._suspects)

    def poll_size(self, size: int) -> int:
        """How many records one poll may take: one at a time while careful."""
        return 1 if self._suspects else size

    def holds_back(self, in_flight: int) -> bool:
        """True while nothing new may start: careful, with a record in flight."""
        return bool(self._suspects) and in_flight > 0

    def step(self, work: PartitionWork, offset: int) -> Step:
        """What the record at ``offset`` needs before it runs.

        The record at the committed position has its attempt counted before anything of
        this assignment runs (whichever record kills the process, this one is the one a
        next owner cannot get past); while careful, every record does.
        """
        head = work.take_head(offset)
        if head is not None and head.attempts >= self._max_attempts:
            return Step(poison_attempts=head.attempts)
        if head is not None:
            return Step(count_attempt=head.attempts + 1)
        if self._suspects:
            return Step(count_attempt=1)
        return Step()

    async def begin(self, suspects: Mapping[TopicPartition, PartitionWork]) -> None:
        """Work ``suspects`` carefully until past what their last owners may have had in
        flight: up to their end offsets now, at most ``window`` records."""
        if not suspects:
            return
        try:
            async with asyncio.timeout(_END_OFFSETS_TIMEOUT_S):
                ends = await self._end_offsets(list(suspects))
        except (KafkaError, TimeoutError):
            ends = {}
        for tp, work in suspects.items():
            assert work.head is not None
            work.careful_until = min(
                ends.get(tp, work.head.offset + 1), work.head.offset + self._window
            )
            self._suspects.add(tp)
            log.warning(
                "the last owner did not finish the record at the committed position; working "
                "one record at a time until past what it may have had in flight",
                extra={
                    "partitions": names([tp]),
                    "offset": work.head.offset,
                    "attempts": work.head.attempts,
                    "careful_until": work.careful_until,
                },
            )

    def finished(self, tp: TopicPartition, work: PartitionWork) -> None:
        """A record of ``tp`` finished: a suspect may be past its head now."""
        if tp in self._suspects and work.careful_done:
            self._suspects.discard(tp)
            if not self._suspects:
                log.info("past every record the last owners did not finish: full speed again")

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """``partitions`` were revoked."""
        self._suspects.difference_update(partitions)
