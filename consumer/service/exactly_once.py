"""Exactly-once delivery: each partition's replies, dead-letter records and offsets in
one Kafka transaction (the protocol is :mod:`consumer.service.transactions`).

This mode owns the per-partition transactional producers: it starts one for each
assigned partition (which fences the last owner's), fetches the partition from the
offset read once that producer had its id, replaces a producer whose transaction failed
otherwise than fenced, and stops them when the partitions go. Answers go into the
partition's outbox (:class:`TransactionalSender`); :class:`TransactionalCommitter`
commits every finished prefix as one transaction per partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.service.attempts import Head, read_committed_offset, read_heads
from consumer.service.commit_policy import CommitLoop, CommitPolicy, names
from consumer.service.kafka_clients import make_transactional_producer, transactional_id
from consumer.service.membership import confirm_membership
from consumer.service.metrics import Metrics
from consumer.service.outputs import OutputRecord, Sender
from consumer.service.transactions import PRODUCER_FAILURES, PartitionTransactions
from consumer.service.worker_config import WorkerConfig

log = logging.getLogger(__name__)

# What a record takes in a request beyond its key, value and headers.
RECORD_OVERHEAD_BYTES = 1024


class TransactionalSender:
    """Outputs go to the source record's partition outbox, not to the broker."""

    def __init__(
        self, partitions: Mapping[TopicPartition, PartitionTransactions], max_record_bytes: int
    ) -> None:
        """``max_record_bytes``: the transactional producers' largest record."""
        self._partitions = partitions
        self._max_bytes = max_record_bytes - RECORD_OVERHEAD_BYTES

    async def send(self, source: ConsumerRecord[Any, Any], output: OutputRecord) -> None:
        """Keep ``output`` for the source partition's next transaction (a record the
        producer would refuse is refused here, so that its sender sends a smaller one)."""
        if output.size > self._max_bytes:
            raise MessageSizeTooLargeError(f"{output.size} bytes is over {self._max_bytes}")
        txns = self._partitions.get(TopicPartition(source.topic, source.partition))
        if txns is None:
            # Revoked meanwhile: give the request up as a cancelled one is given up; it
            # stays uncommitted and the partition's new owner answers it.
            raise asyncio.CancelledError
        txns.put(source.offset, output)


class TransactionalCommitter(CommitLoop):
    """Commits every finished prefix as a transaction per partition."""

    def __init__(
        self,
        partitions: Mapping[TopicPartition, PartitionTransactions],
        interval_s: float,
        membership_lost: Callable[[], bool],
        metrics: Metrics,
    ) -> None:
        super().__init__(interval_s, membership_lost)
        self._partitions = partitions
        self._metrics = metrics

    def _commits_for(self, tp: TopicPartition) -> bool:
        return tp in self._partitions

    async def _commit_offsets(self, offsets: Mapping[TopicPartition, int]) -> set[TopicPartition]:
        results = await asyncio.gather(
            *(self._partitions[tp].commit(offset) for tp, offset in offsets.items())
        )
        for ok in results:
            self._metrics.transactions.labels(outcome="committed" if ok else "failed").inc()
        return {tp for tp, ok in zip(offsets, results, strict=True) if ok}

    async def _commit_position(self, tp: TopicPartition, offset: int, metadata: str) -> bool:
        return await self._partitions[tp].commit(offset, metadata)


class ExactlyOnce:
    """The exactly-once delivery mode (see the module docstring)."""

    def __init__(
        self,
        config: WorkerConfig,
        consumer: Any,
        metrics: Metrics,
        membership_lost: Callable[[], bool],
    ) -> None:
        self._config = config
        self._consumer = consumer
        # each assigned partition's transactional producer and outbox
        self.transactions: dict[TopicPartition, PartitionTransactions] = {}
        self._sender = TransactionalSender(self.transactions, config.max_record_bytes)
        self._committer = TransactionalCommitter(
            self.transactions, config.commit_interval_s, membership_lost, metrics
        )

    @property
    def sender(self) -> Sender:
        return self._sender

    @property
    def committer(self) -> CommitPolicy:
        return self._committer

    async def set_up(self, assigned: set[TopicPartition]) -> dict[TopicPartition, Head]:
        """Start each partition's producer, then fetch it from its head, read once the
        producer had its id.

        The consumer's own start may be older: it read the committed offset before the
        last owner's final transaction was finished (:mod:`consumer.service.transactions`).
        From there the records up to the head would be scored again only for their answers
        to be dropped, and the record at the head would not count as its attempt.
        """
        await self._start(assigned)
        heads = await read_heads(self._consumer, assigned)
        for tp, head in heads.items():
            self._consumer.seek(tp, head.offset)
        return heads

    def set_up_plainly(self, assigned: set[TopicPartition]) -> None:
        """A producer that starts at the partition's first commit, for every partition
        that has none yet."""
        for tp in assigned:
            if tp not in self.transactions:
                txns = self._new(tp)
                txns.broken = True  # its first transaction starts a fresh producer
                self.transactions[tp] = txns

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            txns = self.transactions.pop(tp, None)
            if txns is not None:
                await txns.stop()

    def not_ready_reasons(self) -> list[str]:
        return []

    async def close(self) -> None:
        await self.revoked(set(self.transactions))

    async def _start(self, assigned: set[TopicPartition]) -> None:
        """One transactional producer per partition; starting it fences the last owner's."""
        for tp in assigned:
            txns = self._new(tp)
            try:
                await txns.start()
            except PRODUCER_FAILURES as exc:
                # Raised out of the assignment callback it would leave the partition
                # assigned with no work set up: its records fetched again and again.
                txns.broken = True  # its first transaction starts a fresh producer
                log.warning(
                    "could not start a transactional producer; retrying at the first commit",
                    extra={"partitions": names([tp]), "error": repr(exc)},
                )
            self.transactions[tp] = txns

    def _new(self, tp: TopicPartition) -> PartitionTransactions:
        tid = transactional_id(self._config, tp.topic, tp.partition)
        return PartitionTransactions(
            tp,
            partial(make_transactional_producer, self._config, tid),
            self._config.group_id,
            partial(read_committed_offset, self._consumer, tp),
            partial(confirm_membership, self._consumer, tp),
        )
