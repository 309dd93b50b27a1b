"""Oldest first across partitions, when the in-flight window lets in fewer records than
are waiting.

aiokafka hands out one fetched partition's records until they run out before the next
partition's. While everything fetched fits in flight that order does not matter: the
engine takes the work first come, first served. When it does not fit, the order of
taking decides who waits, and one partition's backlog would be served ahead of older
requests on the others.

So when room limits a poll, the worker moves what the consumer has fetched into a
:class:`Lookahead` of its own, one queue per partition, and lets records in oldest first
by their timestamps (the producer's create time, unless the topic stamps log-append
time): a merge of the partitions' queues, each of which is in offset order.

A record in the lookahead is taken from the consumer (its position is past it) but not
started: its offset is not registered, so no commit passes it. A revoked partition's
queue is dropped, and its new owner fetches those records again; a seek moves the
position back over the queue (:meth:`Lookahead.rewind`).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from aiokafka.structs import ConsumerRecord, TopicPartition

Record: TypeAlias = "ConsumerRecord[Any, Any]"


class Lookahead:
    """Records taken from the consumer and not yet let in, one queue per partition."""

    def __init__(self) -> None:
        self._queues: dict[TopicPartition, deque[Record]] = {}

    def holding(self) -> bool:
        """True while any partition has records waiting here."""
        return bool(self._queues)

    @property
    def size(self) -> int:
        """Records waiting here, across partitions."""
        return sum(len(queue) for queue in self._queues.values())

    def add(self, fetched: Mapping[TopicPartition, Sequence[Record]]) -> None:
        """Queue what one poll of the consumer returned (each partition's records follow
        whatever of that partition is queued already: the consumer's position was past
        it)."""
        for tp, records in fetched.items():
            if records:
                self._queues.setdefault(tp, deque()).extend(records)

    async def refill(self, consumer: Any, partitions: Iterable[TopicPartition]) -> None:
        """Queue what the consumer has fetched of each of ``partitions`` with nothing
        queued here, without waiting for a fetch: then every partition with records
        at hand shows its oldest one."""
        for tp in partitions:
            if tp not in self._queues:
                self.add(await consumer.getmany(tp))

    def take(
        self, size: int, open_partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, list[Record]]:
        """Up to ``size`` queued records of ``open_partitions``, oldest first."""
        heads = [(q[0].timestamp, tp) for tp, q in self._queues.items() if tp in open_partitions]
        heapq.heapify(heads)
        taken: dict[TopicPartition, list[Record]] = {}
        for _ in range(size):
            if not heads:
                break
            _, tp = heads[0]
            queue = self._queues[tp]
            taken.setdefault(tp, []).append(queue.popleft())
            if queue:
                heapq.heapreplace(heads, (queue[0].timestamp, tp))
            else:
                heapq.heappop(heads)
                del self._queues[tp]
        return taken

    def first_offset(self, tp: TopicPartition) -> int | None:
        """The offset of ``tp``'s first queued record (None: nothing queued)."""
        queue = self._queues.get(tp)
        return queue[0].offset if queue else None

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        """Forget the queues of ``partitions`` (revoked: the new owner fetches them)."""
        for tp in partitions:
            self._queues.pop(tp, None)

    def rewind(self, consumer: Any, tp: TopicPartition, offset: int) -> None:
        """Fetch ``tp`` again from ``offset``, or from its first queued record if that is
        older, and forget its queue (its records are fetched again)."""
        queue = self._queues.pop(tp, None)
        consumer.seek(tp, min(offset, queue[0].offset) if queue else offset)
