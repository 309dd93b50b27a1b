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
from prometheus_client import CollectorRegistry

import consumer.service.at_least_once as at_least_once
import consumer.service.exactly_once as exactly_once
from consumer.service.attempts import Head
from consumer.service.careful import CarefulStart
from consumer.service.delivery_mode import DeliveryMode, delivery_mode
from consumer.service.exactly_once import ExactlyOnce
from consumer.service.intake import Intake
from consumer.service.metrics import Metrics
from consumer.service.oldest_first import Lookahead
from consumer.service.partitions import PartitionWork
from consumer.service.rebalance import Rebalance
from consumer.service.worker_config import WorkerConfig

ASSIGNED = {TopicPartition("rerank.requests", 0), TopicPartition("rerank.requests", 1)}


async def _no_end_offsets(partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    return {}


class Parts:
    """A rebalance listener with the worker's parts around it (no Kafka client)."""

    def __init__(self, delivery: str, consumer: Any = None, end_offsets: Any = None) -> None:
        config = WorkerConfig("127.0.0.1:9", delivery=delivery)
        metrics = Metrics(CollectorRegistry())
        self.partitions: dict[TopicPartition, PartitionWork] = {}
        self.careful = CarefulStart(3, 100, end_offsets or _no_end_offsets)
        intake = Intake(config, self.partitions, self.careful, metrics)
        self.mode: DeliveryMode = delivery_mode(config, consumer, None, metrics, lambda: False)
        self.rebalance = Rebalance(
            self.mode,
            self.partitions,
            intake,
            self.careful,
            Lookahead(),
            lambda partitions: None,
            lambda: False,
            config.revoke_timeout_s,
        )

    @property
    def transactions(self) -> dict[TopicPartition, Any]:
        return self.mode.transactions if isinstance(self.mode, ExactlyOnce) else {}


def _patch_heads(monkeypatch: pytest.MonkeyPatch, read: Any) -> None:
    for module in (at_least_once, exactly_once):
        monkeypatch.setattr(module, "read_heads", read)


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_failing_head_read_still_sets_every_partition_up(
    monkeypatch: pytest.MonkeyPatch, delivery: str
) -> None:
    async def broken_read(*args: Any) -> None:
        raise RuntimeError("unexpected")

    async def no_producers(self: Any, assigned: set[TopicPartition]) -> None:
        return None  # exactly-once: the producers did not start either

    _patch_heads(monkeypatch, broken_read)
    monkeypatch.setattr(ExactlyOnce, "_start", no_producers)
    parts = Parts(delivery)
    await parts.rebalance.on_partitions_assigned(set(ASSIGNED))

    assert set(parts.partitions) == ASSIGNED
    assert all(work.head is None for work in parts.partitions.values())
    assert parts.rebalance.in_group
    if delivery == "exactly_once":
        assert set(parts.transactions) == ASSIGNED
        assert all(txns.broken for txns in parts.transactions.values()), "fresh at first commit"
    else:
        assert not parts.transactions


async def test_partitions_set_up_before_the_failure_keep_what_they_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = min(ASSIGNED)

    async def heads(consumer: Any, partitions: Any) -> dict[TopicPartition, Any]:
        return {first: Head(7, 0)}

    async def careful_fails(self: CarefulStart, suspects: Any) -> None:
        raise RuntimeError("unexpected")

    _patch_heads(monkeypatch, heads)
    monkeypatch.setattr(CarefulStart, "begin", careful_fails)
    parts = Parts("at_least_once")
    await parts.rebalance.on_partitions_assigned(set(ASSIGNED))

    assert set(parts.partitions) == ASSIGNED
    head = parts.partitions[first].head
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
        assert suspect not in parts.partitions or suspect in parts.careful.suspects
        await asyncio.sleep(0.01)
        return {tp: 9 for tp in partitions}

    _patch_heads(monkeypatch, heads)
    parts = Parts("at_least_once", consumer=LongPollingConsumer(), end_offsets=reader)
    async with asyncio.timeout(1):
        await parts.rebalance.set_up(set(ASSIGNED))

    assert parts.partitions[suspect].careful_until == 9
    assert parts.careful.suspects == {suspect}


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

    async def producers_started(self: Any, assigned: set[TopicPartition]) -> None:
        order.append("producers")

    async def heads(consumer: Any, partitions: Any) -> dict[TopicPartition, Any]:
        order.append("heads")
        return {first: Head(12, 0)}  # the other partition has no committed offset yet

    _patch_heads(monkeypatch, heads)
    monkeypatch.setattr(ExactlyOnce, "_start", producers_started)
    parts = Parts(delivery, consumer=Consumer())
    await parts.rebalance.set_up(set(ASSIGNED))

    if delivery == "exactly_once":
        assert order == ["producers", "heads"]
        assert seeks == {first: 12}
    else:  # its committed offsets are never read too early: no seek
        assert seeks == {}
    assert parts.partitions[first].head == Head(12, 0)
