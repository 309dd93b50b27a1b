"""Committing what is done: every finished prefix, soon after it moves.

A commit follows progress (a record finished) after at most ``interval_s``, so that a
worker killed without warning leaves few answered-but-uncommitted requests behind (each
one is redelivered and answered twice); commits never run more often than that.

Nothing is committed while the group no longer knows this member (session or poll
timeout): the partitions may be another member's by then, and a commit could move its
offsets. Failures are logged, not raised, and a failed commit is tried again after
``interval_s`` whether or not more records finish (:func:`commit_after_progress`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from consumer.service.attempts import encode_attempts
from consumer.service.partitions import PartitionWork

log = logging.getLogger(__name__)

COMMIT_TIMEOUT_S = 10.0

Work = Callable[[], Mapping[TopicPartition, PartitionWork]]


async def commit_after_progress(
    progress: asyncio.Event,
    commit: Callable[[Mapping[TopicPartition, PartitionWork]], Awaitable[bool]],
    work: Work,
    interval_s: float,
) -> None:
    """Commit after progress, at most every ``interval_s``, until cancelled.

    A commit that fails is tried again after ``interval_s`` without waiting for more
    progress: what it left behind (the offsets, and in exactly-once mode the replies
    themselves) must not wait for a next request, which may never come. Before, an
    exactly-once worker whose transaction failed while the broker was frozen kept its
    replies unsent for minutes once the traffic had stopped.
    """
    while True:
        await progress.wait()
        progress.clear()
        if not await commit(work()):
            progress.set()
        await asyncio.sleep(interval_s)


class Committer:
    """Commits the finished prefixes of the worker's partitions through its consumer."""

    def __init__(
        self,
        consumer: Any,
        interval_s: float,
        membership_lost: Callable[[], bool],
        timeout_s: float = COMMIT_TIMEOUT_S,
    ) -> None:
        self._consumer = consumer
        self._interval_s = interval_s
        self._membership_lost = membership_lost
        self._timeout_s = timeout_s
        self._progress = asyncio.Event()
        self._lock = asyncio.Lock()

    def progress(self) -> None:
        """A record finished: a commit follows within ``interval_s``."""
        self._progress.set()

    async def run(self, work: Work) -> None:
        """Commit after progress, at most every ``interval_s``, until cancelled."""
        await commit_after_progress(self._progress, self.commit, work, self._interval_s)

    async def commit(self, work: Mapping[TopicPartition, PartitionWork]) -> bool:
        """Commit every finished prefix in ``work``; True if all of it is committed."""
        if self._membership_lost():
            return False
        async with self._lock:
            # Read under the lock: an attempt count committed meanwhile must not be
            # overwritten by a position read before it.
            offsets = {tp: w.offsets.uncommitted for tp, w in work.items()}
            to_commit = {tp: offset for tp, offset in offsets.items() if offset is not None}
            if not to_commit:
                return True
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._consumer.commit(to_commit)
            except (KafkaError, TimeoutError) as exc:
                # Usually a rebalance in progress; the next commit (or the revoke) covers it.
                log.warning(
                    "offset commit failed",
                    extra={"error": repr(exc), "partitions": names(to_commit)},
                )
                return False
        for tp, offset in to_commit.items():
            work[tp].offsets.mark_committed(offset)
        return True

    async def commit_attempt(
        self, tp: TopicPartition, work: PartitionWork, offset: int, attempts: int
    ) -> bool:
        """Commit ``offset`` (the partition's committed position) with ``attempts`` in its
        metadata, before the record there is processed (:mod:`consumer.service.attempts`).
        """
        if self._membership_lost():
            return False
        async with self._lock:
            try:
                commit = self._consumer.commit({tp: (offset, encode_attempts(attempts))})
                async with asyncio.timeout(self._timeout_s):
                    await commit
            except (KafkaError, TimeoutError) as exc:
                log.warning(
                    "could not record a record's attempt count",
                    extra={"error": repr(exc), "partitions": names([tp]), "offset": offset},
                )
                return False
        work.offsets.mark_committed(offset)
        return True


def names(partitions: Iterable[TopicPartition]) -> list[str]:
    """``topic-partition`` names, sorted, for log lines."""
    return sorted(f"{tp.topic}-{tp.partition}" for tp in partitions)
