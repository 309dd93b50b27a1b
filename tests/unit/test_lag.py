"""The lag loop stops when cancelled, even when a lag update finishes at that moment.

Python 3.11's ``asyncio.wait_for`` returns the inner result instead of raising when the
outer task is cancelled in the same loop turn as the inner work completes; a loop built
on it then swallowed the cancel and ran on, and the worker's stop waited for it forever
(seen once in CI: a clean stop timed out after 60 s).
"""

from __future__ import annotations

import asyncio

from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from consumer.service.lag import LagReporter
from consumer.service.metrics import Metrics

TP = TopicPartition("rerank.requests", 0)


class _GatedConsumer:
    """Answers end_offsets when the test opens the gate."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.gate: asyncio.Future[dict[TopicPartition, int]] = (
            asyncio.get_running_loop().create_future()
        )

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.asked.set()
        return await self.gate

    async def position(self, tp: TopicPartition) -> int:
        return 3


async def test_cancel_arriving_as_an_update_finishes_stops_the_loop() -> None:
    consumer = _GatedConsumer()
    metrics = Metrics(CollectorRegistry())
    loop_task = asyncio.create_task(LagReporter(consumer, metrics).run(0.0, lambda: [TP]))
    await asyncio.wait_for(consumer.asked.wait(), 5)

    # Both in one turn: the update can finish and the cancel lands together.
    consumer.gate.set_result({TP: 10})
    loop_task.cancel()

    done, _ = await asyncio.wait({loop_task}, timeout=2)
    assert loop_task in done, "the lag loop ran on after being cancelled"
    assert loop_task.cancelled()


class _FixedConsumer:
    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 10 for tp in partitions}

    async def position(self, tp: TopicPartition) -> int:
        return 8


async def test_records_taken_but_not_started_count_as_lag() -> None:
    """Records in the worker's lookahead are past the consumer's position but still wait:
    the lag counts from the first of them."""
    metrics = Metrics(CollectorRegistry())
    other = TopicPartition("rerank.requests", 1)
    waiting = {TP: 5}
    await LagReporter(_FixedConsumer(), metrics, waiting.get).update([TP, other])
    assert metrics.consumer_lag.labels(TP.topic, "0")._value.get() == 5
    assert metrics.consumer_lag.labels(other.topic, "1")._value.get() == 2
