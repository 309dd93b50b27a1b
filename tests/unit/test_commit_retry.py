"""A commit that fails is tried again without waiting for the next request.

In the chaos suite an exactly-once worker's transaction failed while the broker was
frozen, the traffic stopped meanwhile, and 236 replies stayed in the outbox for minutes:
the commit loop only ran again after a record finished. These use fakes of our own
interfaces (the consumer's ``commit``, a partition's transactions), no Kafka behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from consumer.service.commit_policy import OffsetCommitter
from consumer.service.exactly_once import TransactionalCommitter
from consumer.service.metrics import Metrics
from consumer.service.partitions import PartitionWork

TP = TopicPartition("rerank.requests", 0)
INTERVAL_S = 0.01


def finished_work(upto: int) -> dict[TopicPartition, PartitionWork]:
    """One partition whose records below ``upto`` are all done."""
    work = PartitionWork()
    for offset in range(upto):
        work.offsets.register(offset)
        work.offsets.done(offset)
    return {TP: work}


class FlakyConsumer:
    """``commit`` fails ``failures`` times, then succeeds; records every call."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.commits: list[dict[TopicPartition, Any]] = []

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append(dict(offsets))
        if len(self.commits) <= self.failures:
            raise KafkaConnectionError("broker away")


class FlakyTransactions:
    """A partition's transactions: the first ``failures`` commits fail."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.commits: list[int] = []

    async def commit(self, upto: int, metadata: str = "") -> bool:
        self.commits.append(upto)
        return len(self.commits) > self.failures


async def run_once_and_wait(
    run: Callable[[], Awaitable[None]], progress: Callable[[], None], done: Callable[[], bool]
) -> None:
    """Start the commit loop, report progress once, wait until ``done`` (or fail)."""
    loop = asyncio.create_task(run())
    try:
        progress()  # one record finished; no other ever will
        async with asyncio.timeout(2.0):
            while not done():
                await asyncio.sleep(INTERVAL_S)
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def test_a_failed_offset_commit_is_retried_without_more_progress() -> None:
    consumer = FlakyConsumer(failures=2)
    work = finished_work(5)
    committer = OffsetCommitter(consumer, INTERVAL_S, membership_lost=lambda: False)
    await run_once_and_wait(
        lambda: committer.run(lambda: work),
        committer.progress,
        lambda: work[TP].offsets.uncommitted is None,
    )
    assert consumer.commits == [{TP: 5}] * 3


async def test_a_failed_transaction_is_retried_without_more_progress() -> None:
    transactions = FlakyTransactions(failures=2)
    work = finished_work(7)
    committer = TransactionalCommitter(
        {TP: transactions},  # type: ignore[dict-item]
        INTERVAL_S,
        membership_lost=lambda: False,
        metrics=Metrics(CollectorRegistry()),
    )
    await run_once_and_wait(
        lambda: committer.run(lambda: work),
        committer.progress,
        lambda: work[TP].offsets.uncommitted is None,
    )
    assert transactions.commits == [7, 7, 7]


async def test_nothing_is_retried_once_everything_is_committed() -> None:
    consumer = FlakyConsumer(failures=0)
    work = finished_work(3)
    committer = OffsetCommitter(consumer, INTERVAL_S, membership_lost=lambda: False)
    await run_once_and_wait(
        lambda: committer.run(lambda: work),
        committer.progress,
        lambda: bool(consumer.commits),
    )
    await asyncio.sleep(10 * INTERVAL_S)
    assert consumer.commits == [{TP: 3}]
