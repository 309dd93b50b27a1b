"""Exactly-once keeps answers in memory until their transaction commits: bounded.

An outside review ran a worker whose transactions could never commit (its TransactionalId
ACLs missing) with ``max_uncommitted_records`` 50: it read and answered 2,000 requests into
its outbox and stayed ready. These use fakes of our own interfaces (no Kafka behaviour).
"""

from __future__ import annotations

from typing import Any

from aiokafka.errors import TransactionalIdAuthorizationFailed
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from consumer.service.careful import CarefulStart
from consumer.service.exactly_once import ExactlyOnce
from consumer.service.failures import NotAuthorized, TransactionsFailing
from consumer.service.intake import Intake
from consumer.service.metrics import Metrics
from consumer.service.outputs import OutputRecord
from consumer.service.partitions import Hold, PartitionWork
from consumer.service.transactions import PartitionTransactions
from consumer.service.worker_config import WorkerConfig

TP = TopicPartition("rerank.requests", 0)


class Consumer:
    """What the intake's flow control uses of the consumer: pause and resume."""

    def __init__(self) -> None:
        self.paused_partitions: set[TopicPartition] = set()

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_partitions)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.difference_update(partitions)


async def never() -> Any:
    raise AssertionError("not asked")


def mode_with(config: WorkerConfig, now: list[float], stops: list[Exception]) -> ExactlyOnce:
    mode = ExactlyOnce(
        config, None, Metrics(CollectorRegistry()), lambda: False, stops.append, lambda: now[0]
    )
    mode.transactions[TP] = PartitionTransactions(TP, object, "group", never, never)
    return mode


def reply(size: int) -> OutputRecord:
    return OutputRecord("rerank.replies", None, b"k", b"x" * size, [])


def intake_over(config: WorkerConfig, mode: ExactlyOnce, work: PartitionWork) -> Consumer:
    consumer = Consumer()
    intake = Intake(config, {TP: work}, CarefulStart(3, 10, never), Metrics(CollectorRegistry()))
    intake.bind(consumer, object(), mode)  # type: ignore[arg-type]
    intake._after_commits()  # what a round of commits (here: failed ones) calls
    return consumer


def test_answers_waiting_in_the_outbox_count_toward_the_backlog_cap() -> None:
    config = WorkerConfig(delivery="exactly_once", max_uncommitted_records=50)
    mode = mode_with(config, [0.0], [])
    work = PartitionWork()
    for offset in range(60):  # answered: finished, so no longer in the offsets' backlog
        work.offsets.register(offset)
        work.offsets.done(offset)
        mode.transactions[TP].put(offset, reply(10))
    assert work.offsets.backlog == 0
    consumer = intake_over(config, mode, work)
    assert Hold.UNCOMMITTED_BACKLOG in work.holds
    assert consumer.paused() == {TP}


def test_the_outboxes_bytes_are_capped() -> None:
    config = WorkerConfig(delivery="exactly_once", max_outbox_bytes=10_000)
    mode = mode_with(config, [0.0], [])
    work = PartitionWork()
    mode.transactions[TP].put(0, reply(20_000))
    assert mode.full()
    assert intake_over(config, mode, work).paused() == {TP}
    mode.transactions[TP]._remove([0])  # committed
    assert not mode.full()


def test_transactions_failing_long_make_the_worker_not_ready_then_stop_it() -> None:
    config = WorkerConfig(
        delivery="exactly_once", transactions_unready_after_s=30, transactions_give_up_after_s=60
    )
    now, stops = [100.0], []
    mode = mode_with(config, now, stops)
    mode.transactions[TP].failing_since = 100.0
    now[0] = 120.0
    assert mode.not_ready_reasons() == []
    now[0] = 131.0
    (reason,) = mode.not_ready_reasons()
    assert "transactions failing" in reason and "rerank.requests-0" in reason
    mode._check_health()
    assert stops == []
    now[0] = 161.0
    mode._check_health()
    (stop,) = stops
    assert isinstance(stop, TransactionsFailing) and "60 s" in str(stop)


def test_a_refused_transactional_id_stops_the_worker_with_one_clear_error() -> None:
    stops: list[Exception] = []
    mode = mode_with(WorkerConfig(delivery="exactly_once"), [0.0], stops)
    mode.transactions[TP]._failed(TransactionalIdAuthorizationFailed("rerank.g.t.0"))
    mode._check_health()
    (stop,) = stops
    assert isinstance(stop, NotAuthorized) and "transactional ids" in str(stop)


async def test_revoked_partitions_stop_their_producers_at_once() -> None:
    """One after another, six producers waiting on a hung broker (10 s each) outlasted the
    group's 60 s rebalance timeout."""
    import asyncio
    import time

    class SlowToStop(PartitionTransactions):
        async def stop(self) -> None:
            await asyncio.sleep(0.3)

    mode = mode_with(WorkerConfig(delivery="exactly_once"), [0.0], [])
    partitions = {TopicPartition("rerank.requests", p) for p in range(6)}
    for tp in partitions:
        mode.transactions[tp] = SlowToStop(tp, object, "group", never, never)
    started = time.monotonic()
    await mode.revoked(partitions)
    assert time.monotonic() - started < 1.0
    assert not mode.transactions
