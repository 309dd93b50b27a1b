"""An unexpected failure while setting up assigned partitions still sets them up.

aiokafka logs an exception out of ``on_partitions_assigned`` and carries on, so without a
fallback the partitions stay assigned with no work: every record fetched for them is sought
back for ever and never answered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

import consumer.service.worker as worker_module
from consumer.service.attempts import Head
from consumer.service.worker import Worker
from consumer.service.worker_config import WorkerConfig

ASSIGNED = {TopicPartition("rerank.requests", 0), TopicPartition("rerank.requests", 1)}


def _worker(delivery: str) -> Worker:
    return Worker(WorkerConfig("127.0.0.1:9", delivery=delivery), object())  # type: ignore[arg-type]


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_failing_head_read_still_sets_every_partition_up(
    monkeypatch: pytest.MonkeyPatch, delivery: str
) -> None:
    async def broken_read(*args: Any) -> None:
        raise RuntimeError("unexpected")

    async def no_producers(assigned: set[TopicPartition]) -> None:
        return None  # exactly-once: the producers did not start either

    monkeypatch.setattr(worker_module, "read_heads", broken_read)
    worker = _worker(delivery)
    monkeypatch.setattr(worker, "_start_transactions", no_producers)
    await worker._on_assigned(set(ASSIGNED))

    assert set(worker._work) == ASSIGNED
    assert all(work.head is None for work in worker._work.values())
    assert worker._in_group
    if delivery == "exactly_once":
        assert set(worker._txns) == ASSIGNED
        assert all(txns.broken for txns in worker._txns.values()), "fresh at the first commit"
    else:
        assert not worker._txns


async def test_partitions_set_up_before_the_failure_keep_what_they_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = min(ASSIGNED)

    async def heads(consumer: Any, partitions: Any) -> dict[TopicPartition, Any]:
        return {first: Head(7, 0)}

    async def careful_fails(self: Worker, suspects: Any) -> None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(worker_module, "read_heads", heads)
    monkeypatch.setattr(Worker, "_be_careful_with", careful_fails)
    worker = _worker("at_least_once")
    await worker._on_assigned(set(ASSIGNED))

    assert set(worker._work) == ASSIGNED
    head = worker._work[first].head
    assert head is not None and head.offset == 7


async def test_a_careful_start_reads_end_offsets_off_the_consumers_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The consumer's connection may still hold a fetch long-poll for the partitions held
    # before the rebalance, and the broker answers one request per connection at a time:
    # the end offsets come from the worker's offsets reader instead.
    suspect = min(ASSIGNED)

    class LongPollingConsumer:
        async def end_offsets(self, partitions: Any) -> dict[TopicPartition, int]:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

    async def heads(consumer: Any, partitions: Any) -> dict[TopicPartition, Any]:
        return {suspect: Head(7, 1)}  # its last owner did not finish offset 7

    async def reader(partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        # While this waits the fetch loop runs: a partition it can see must already be
        # worked carefully, or it would score the records the last owner died on at once.
        assert suspect not in worker._work or suspect in worker._suspects
        await asyncio.sleep(0.01)
        return {tp: 9 for tp in partitions}

    monkeypatch.setattr(worker_module, "read_heads", heads)
    worker = _worker("at_least_once")
    worker._consumer = LongPollingConsumer()  # type: ignore[assignment]
    worker._end_offsets = reader  # type: ignore[assignment]
    async with asyncio.timeout(1):
        await worker._set_up(set(ASSIGNED))

    assert worker._work[suspect].careful_until == 9
    assert worker._suspects == {suspect}


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_exactly_once_fetches_from_the_head_read_after_the_producer_started(
    monkeypatch: pytest.MonkeyPatch, delivery: str
) -> None:
    # The consumer read its start before the last owner's final transaction finished; the
    # head read once this worker's producer had its id is past it. Fetching from the
    # older start would score those records again only to drop their answers.
    order: list[str] = []
    seeks: dict[TopicPartition, int] = {}
    first = min(ASSIGNED)

    class Consumer:
        def seek(self, tp: TopicPartition, offset: int) -> None:
            seeks[tp] = offset

    async def producers_started(assigned: set[TopicPartition]) -> None:
        order.append("producers")

    async def heads(consumer: Any, partitions: Any) -> dict[TopicPartition, Any]:
        order.append("heads")
        return {first: Head(12, 0)}  # the other partition has no committed offset yet

    monkeypatch.setattr(worker_module, "read_heads", heads)
    worker = _worker(delivery)
    worker._consumer = Consumer()  # type: ignore[assignment]
    monkeypatch.setattr(worker, "_start_transactions", producers_started)
    await worker._set_up(set(ASSIGNED))

    if delivery == "exactly_once":
        assert order == ["producers", "heads"]
        assert seeks == {first: 12}
    else:  # its committed offsets are never read too early: no seek
        assert seeks == {}
    assert worker._work[first].head == Head(12, 0)
