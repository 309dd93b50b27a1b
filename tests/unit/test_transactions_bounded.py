"""A transaction step that ignores its cancellation cannot stall the commits.

aiokafka code that swallows a cancel would make a cancel-based timeout
(``asyncio.timeout``) wait for ever; ``bounded`` gives up anyway, so the partition's
producer is marked broken and replaced at the next commit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

import consumer.service.transactions as transactions
from consumer.service.transactions import PartitionTransactions, bounded

TP = TopicPartition("rerank.requests", 0)


async def _stubborn(release: asyncio.Event) -> str:
    """Work that shrugs off cancellation until ``release`` is set."""
    while True:
        try:
            await release.wait()
            return "done late"
        except asyncio.CancelledError:
            continue  # the misbehaviour under test


async def test_bounded_gives_up_on_work_that_ignores_its_cancel() -> None:
    release = asyncio.Event()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await bounded(_stubborn(release), 0.2)
    assert time.monotonic() - started < 1.0
    release.set()  # let the abandoned task end
    await asyncio.sleep(0)


async def test_bounded_returns_the_result_and_passes_errors_on() -> None:
    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise ValueError("no")

    assert await bounded(answer(), 1.0) == 42
    with pytest.raises(ValueError):
        await bounded(fail(), 1.0)


class _StubbornProducer:
    """A transactional producer whose commit never ends and ignores cancellation."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def begin_transaction(self) -> None:
        return None

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        return None

    async def commit_transaction(self) -> None:
        await _stubborn(self.release)


async def test_a_stuck_commit_marks_the_producer_broken_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transactions, "TXN_TIMEOUT_S", 0.2)
    producer = _StubbornProducer()

    async def nothing_committed() -> None:
        return None

    txns = PartitionTransactions(TP, lambda: producer, "group", nothing_committed, still_owner)
    txns.producer = producer
    txns.floor = 0  # the committed offset was read: straight to the transaction
    started = time.monotonic()
    assert await txns.commit(upto=5) is False
    assert time.monotonic() - started < 1.0
    assert txns.broken, "the next commit starts a fresh producer"
    producer.release.set()
    await asyncio.sleep(0)


class _AssertingProducer:
    """A producer whose start fails as aiokafka's did just after a broker freeze."""

    async def start(self) -> None:
        raise AssertionError("Did we not perform bootstrap?")

    async def stop(self) -> None:
        return None


async def test_a_producer_start_that_asserts_still_sets_the_partition_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception out of the assignment callback left the partition assigned with no
    work set up: its records were fetched again and again and never answered (chaos
    "broker SIGSTOP", exactly-once: 156 of 351 requests lost)."""
    from prometheus_client import CollectorRegistry

    import consumer.service.exactly_once as exactly_once
    from consumer.service.metrics import Metrics
    from consumer.service.worker_config import WorkerConfig

    monkeypatch.setattr(
        exactly_once, "make_transactional_producer", lambda *a: _AssertingProducer()
    )
    config = WorkerConfig("127.0.0.1:9", delivery="exactly_once")
    mode = exactly_once.ExactlyOnce(config, None, Metrics(CollectorRegistry()), lambda: False)
    await mode._start({TP})
    assert mode.transactions[TP].broken, "its first commit starts a fresh producer"


async def test_a_fresh_producer_that_asserts_fails_only_its_commit() -> None:
    async def nothing_committed() -> None:
        return None

    txns = PartitionTransactions(TP, _AssertingProducer, "group", nothing_committed, still_owner)
    txns.broken = True
    assert await txns.commit(upto=5) is False
    assert txns.broken, "tried again with a fresh producer at the next commit"


async def still_owner() -> bool:
    return True


async def test_a_broken_partition_starts_no_producer_unless_the_group_confirms_it() -> None:
    """A zombie (paused past its session) whose transaction failed otherwise than fenced:
    a fresh producer would fence the partition's real owner. It is started only once
    the coordinator confirms that this worker still has the partition."""
    started: list[object] = []
    answers = [False, True]

    async def nothing_committed() -> None:
        return None

    async def coordinator_says() -> bool:
        return answers.pop(0)

    def make_producer() -> _AssertingProducer:
        started.append(object())
        return _AssertingProducer()

    txns = PartitionTransactions(TP, make_producer, "group", nothing_committed, coordinator_says)
    txns.broken = True
    assert await txns.commit(upto=5) is False
    assert started == [], "no producer while membership is not confirmed"
    assert txns.broken and not txns.fenced, "asked again at the next commit"
    assert await txns.commit(upto=5) is False  # confirmed: a producer starts (and asserts)
    assert len(started) == 1
