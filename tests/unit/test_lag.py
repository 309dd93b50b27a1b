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
