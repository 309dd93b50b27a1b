"""Committing what is done: every finished prefix, soon after it moves.

Both delivery modes commit the same way and differ only in how one commit reaches Kafka:
through the consumer's offset commit (at-least-once, :class:`OffsetCommitter`) or as one
transaction per partition with its replies (exactly-once,
:class:`consumer.service.exactly_once.TransactionalCommitter`). :class:`CommitLoop` is the
common part, and :class:`CommitPolicy` the interface the worker sees.

A commit follows progress (a record finished) after at most ``interval_s``, so that a
worker killed without warning leaves few answered-but-uncommitted requests behind (each
one is redelivered and answered twice); commits never run more often than that. A commit
that fails is tried again after ``interval_s`` without waiting for more progress: what
it left behind (the offsets, and in exactly-once mode the replies themselves) must not
wait for a next request, which may never come.

Nothing is committed while the group no longer knows this member (session or poll
timeout): the partitions may be another member's by then, and a commit could move its
offsets. Failures are logged, not raised.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from consumer.service.attempts import encode_attempts
from consumer.service.partitions import PartitionWork

log = logging.getLogger(__name__)

COMMIT_TIMEOUT_S = 10.0

# The worker's partitions and their work now (a mapping read afresh at every commit).
WorkSnapshot = Callable[[], Mapping[TopicPartition, PartitionWork]]


class CommitPolicy(Protocol):
    """How finished prefixes, and the attempt counts of careful starts, are committed."""

    def progress(self) -> None:
        """A record finished: a commit follows within the commit interval."""
        ...

    async def run(self, snapshot: WorkSnapshot) -> None:
        """Commit after progress until cancelled."""
        ...

    async def commit(self, work: Mapping[TopicPartition, PartitionWork]) -> bool:
        """Commit every finished prefix in ``work``; True if all of it is committed."""
        ...

    async def commit_attempt(
        self, tp: TopicPartition, work: PartitionWork, offset: int, attempts: int
    ) -> bool:
        """Commit ``offset`` (the partition's committed position) with ``attempts`` in its
        metadata, before the record there is processed (:mod:`consumer.service.attempts`)."""
        ...


class CommitLoop(ABC):
    """What both commit policies share: the progress signal, the loop, the lock, and the
    bookkeeping of what is committed. Subclasses say how offsets reach Kafka."""

    def __init__(self, interval_s: float, membership_lost: Callable[[], bool]) -> None:
        self._interval_s = interval_s
        self._membership_lost = membership_lost
        self._progress = asyncio.Event()
        # one commit at a time: an attempt count committed meanwhile must not be
        # overwritten by a position read before it
        self._lock = asyncio.Lock()

    def progress(self) -> None:
        """A record finished: a commit follows within ``interval_s``."""
        self._progress.set()

    async def run(self, snapshot: WorkSnapshot) -> None:
        """Commit after progress, at most every ``interval_s``, until cancelled; a failed
        commit is tried again without waiting for more progress."""
        while True:
            await self._progress.wait()
            self._progress.clear()
            if not await self.commit(snapshot()):
                self._progress.set()
            await asyncio.sleep(self._interval_s)

    async def commit(self, work: Mapping[TopicPartition, PartitionWork]) -> bool:
        """Commit every finished prefix in ``work``; True if all of it is committed."""
        if self._membership_lost():
            return False
        async with self._lock:
            pending = {
                tp: offset
                for tp, w in work.items()
                if (offset := w.offsets.uncommitted) is not None and self._commits_for(tp)
            }
            if not pending:
                return True
            committed = await self._commit_offsets(pending)
        for tp in committed:
            work[tp].offsets.mark_committed(pending[tp])
        return committed >= pending.keys()

    async def commit_attempt(
        self, tp: TopicPartition, work: PartitionWork, offset: int, attempts: int
    ) -> bool:
        """Commit ``offset`` with ``attempts`` in its metadata."""
        if not self._commits_for(tp) or self._membership_lost():
            return False
        async with self._lock:
            ok = await self._commit_position(tp, offset, encode_attempts(attempts))
        if ok:
            work.offsets.mark_committed(offset)
        return ok

    def _commits_for(self, tp: TopicPartition) -> bool:
        """Whether this policy can commit ``tp`` now."""
        return True

    @abstractmethod
    async def _commit_offsets(self, offsets: Mapping[TopicPartition, int]) -> set[TopicPartition]:
        """Commit ``offsets``; the partitions whose commit went through."""

    @abstractmethod
    async def _commit_position(self, tp: TopicPartition, offset: int, metadata: str) -> bool:
        """Commit one partition's ``offset`` with ``metadata``; True when it went through."""


class OffsetCommitter(CommitLoop):
    """At-least-once: the consumer's offset commit, bounded by ``timeout_s``."""

    def __init__(
        self,
        consumer: Any,
        interval_s: float,
        membership_lost: Callable[[], bool],
        timeout_s: float = COMMIT_TIMEOUT_S,
    ) -> None:
        super().__init__(interval_s, membership_lost)
        self._consumer = consumer
        self._timeout_s = timeout_s

    async def _commit_offsets(self, offsets: Mapping[TopicPartition, int]) -> set[TopicPartition]:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._consumer.commit(dict(offsets))
        except (KafkaError, TimeoutError) as exc:
            # Usually a rebalance in progress; the next commit (or the revoke) covers it.
            log.warning(
                "offset commit failed", extra={"error": repr(exc), "partitions": names(offsets)}
            )
            return set()
        return set(offsets)

    async def _commit_position(self, tp: TopicPartition, offset: int, metadata: str) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._consumer.commit({tp: (offset, metadata)})
        except (KafkaError, TimeoutError) as exc:
            log.warning(
                "could not record a record's attempt count",
                extra={"error": repr(exc), "partitions": names([tp]), "offset": offset},
            )
            return False
        return True


def names(partitions: Iterable[TopicPartition]) -> list[str]:
    """``topic-partition`` names, sorted, for log lines."""
    return sorted(f"{tp.topic}-{tp.partition}" for tp in partitions)
