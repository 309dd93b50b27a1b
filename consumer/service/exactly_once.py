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
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.service.attempts import Head, read_committed_offset, read_heads
from consumer.service.commit_policy import CommitLoop, CommitPolicy, names
from consumer.service.failures import NotAuthorized, TransactionsFailing
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
    """Commits every finished prefix as a transaction per partition; ``after_commits`` is
    called after each round (the mode's health, the outbox's holds)."""

    def __init__(
        self,
        partitions: Mapping[TopicPartition, PartitionTransactions],
        interval_s: float,
        membership_lost: Callable[[], bool],
        metrics: Metrics,
        after_commits: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(interval_s, membership_lost)
        self._partitions = partitions
        self._metrics = metrics
        self._after_commits = after_commits

    def _commits_for(self, tp: TopicPartition) -> bool:
        return tp in self._partitions

    async def _commit_offsets(self, offsets: Mapping[TopicPartition, int]) -> set[TopicPartition]:
        results = await asyncio.gather(
            *(self._partitions[tp].commit(offset) for tp, offset in offsets.items())
        )
        for ok in results:
            self._metrics.transactions.labels(outcome="committed" if ok else "failed").inc()
        self._after_commits()
        return {tp for tp, ok in zip(offsets, results, strict=True) if ok}

    async def _commit_position(self, tp: TopicPartition, offset: int, metadata: str) -> bool:
        ok = await self._partitions[tp].commit(offset, metadata)
        self._after_commits()
        return ok


class ExactlyOnce:
    """The exactly-once delivery mode (see the module docstring)."""

    def __init__(
        self,
        config: WorkerConfig,
        consumer: Any,
        metrics: Metrics,
        membership_lost: Callable[[], bool],
        on_fatal: Callable[[Exception], None] = lambda error: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_fatal``: stops the worker (transactions refused for good, or failing past
        ``transactions_give_up_after_s``)."""
        self._config = config
        self._consumer = consumer
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._clock = clock
        self._after_commits: Callable[[], None] = lambda: None
        # each assigned partition's transactional producer and outbox
        self.transactions: dict[TopicPartition, PartitionTransactions] = {}
        self._sender = TransactionalSender(self.transactions, config.max_record_bytes)
        self._committer = TransactionalCommitter(
            self.transactions,
            config.commit_interval_s,
            membership_lost,
            metrics,
            after_commits=self._check_health,
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
        """Stop the partitions' producers, all at once: each may wait up to its bound on a
        broker that does not answer, and one after another they would outlast the
        group's rebalance timeout."""
        gone = [txns for tp in partitions if (txns := self.transactions.pop(tp, None))]
        await asyncio.gather(*(txns.stop() for txns in gone))

    def not_ready_reasons(self) -> list[str]:
        limit = self._config.transactions_unready_after_s
        failing = self._failing_longer_than(limit)
        if not failing:
            return []
        return [f"transactions failing for more than {limit:g} s: {', '.join(names(failing))}"]

    def waiting(self, tp: TopicPartition) -> int:
        """Answers of ``tp`` waiting in its outbox for a transaction."""
        txns = self.transactions.get(tp)
        return len(txns.outbox) if txns is not None else 0

    def full(self) -> bool:
        """True while the outboxes hold ``max_outbox_bytes`` or more: take nothing new."""
        held = sum(txns.outbox_bytes for txns in self.transactions.values())
        return held >= self._config.max_outbox_bytes

    def on_commits(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every round of commits (outboxes drained: holds may
        lift)."""
        self._after_commits = callback

    async def close(self) -> None:
        await self.revoked(set(self.transactions))

    def _check_health(self) -> None:
        """Stop the worker when transactions are refused for good, or have failed for
        longer than ``transactions_give_up_after_s``: its answers wait in memory meanwhile,
        and only an operator can make them committable."""
        self._after_commits()
        self._metrics.outbox_records.set(sum(len(t.outbox) for t in self.transactions.values()))
        self._metrics.outbox_bytes.set(sum(t.outbox_bytes for t in self.transactions.values()))
        refused = next((t for t in self.transactions.values() if t.unauthorized), None)
        if refused is not None:
            self._on_fatal(
                NotAuthorized(
                    f"not authorized: {refused.unauthorized!r} on the transactions of "
                    f"{names([refused.tp])[0]}; this worker's principal needs WRITE and "
                    "DESCRIBE on the transactional ids starting "
                    f"{self._config.transactional_id_prefix!r} (docs/operations.md, Kafka ACLs)"
                )
            )
            return
        limit = self._config.transactions_give_up_after_s
        failing = self._failing_longer_than(limit)
        if failing:
            self._on_fatal(
                TransactionsFailing(
                    f"transactions have failed for more than {limit:g} s on "
                    f"{', '.join(names(failing))}; stopping (their answers stay uncommitted "
                    "and are answered again by the partitions' next owner)"
                )
            )

    def _failing_longer_than(self, seconds: float) -> list[TopicPartition]:
        now = self._clock()
        return [
            tp
            for tp, txns in self.transactions.items()
            if txns.failing_since is not None and now - txns.failing_since > seconds
        ]

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
        self._check_health()

    def _new(self, tp: TopicPartition) -> PartitionTransactions:
        tid = transactional_id(self._config, tp.topic, tp.partition)
        return PartitionTransactions(
            tp,
            partial(make_transactional_producer, self._config, tid),
            self._config.group_id,
            partial(read_committed_offset, self._consumer, tp),
            partial(confirm_membership, self._consumer, tp),
        )
