"""The lag metric: its loop stops when cancelled, even when a lag update finishes at
that moment; its end offsets come from a client of their own.

Python 3.11's ``asyncio.wait_for`` returns the inner result instead of raising when the
outer task is cancelled in the same loop turn as the inner work completes; a loop built
on it then swallowed the cancel and ran on, and the worker's stop waited for it forever
(seen once in CI: a clean stop timed out after 60 s).
"""

from __future__ import annotations

import asyncio

from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from consumer.service.lag import EndOffsets, LagReporter
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


class _SideClient:
    """An offsets reader that fails to start the first ``failures`` times."""

    def __init__(self, failures: int, log: list[str]) -> None:
        self._failures = failures
        self._log = log

    async def start(self) -> None:
        self._log.append("start")
        if len(self._log) <= self._failures * 2:
            raise ConnectionError("broker down")

    async def stop(self) -> None:
        self._log.append("stop")

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self._log.append("ends")
        return {tp: 7 for tp in partitions}


async def test_end_offsets_start_their_client_once_and_retry_a_failed_start() -> None:
    log: list[str] = []
    made: list[_SideClient] = []

    def make() -> _SideClient:
        made.append(_SideClient(failures=1, log=log))
        return made[-1]

    ends = EndOffsets(make)
    try:
        await ends([TP])
    except ConnectionError:
        pass
    else:
        raise AssertionError("the failed start should raise")
    assert log == ["start", "stop"]  # the failed client is stopped, not kept
    assert await ends([TP]) == {TP: 7}
    assert await ends([TP]) == {TP: 7}
    assert log == ["start", "stop", "start", "ends", "ends"] and len(made) == 2
    await ends.close()
    await ends.close()  # a second close does nothing
    assert log[-1] == "stop" and log.count("stop") == 2


async def test_the_reporter_asks_the_given_end_offsets_not_the_consumer() -> None:
    metrics = Metrics(CollectorRegistry())
    asked: list[list[TopicPartition]] = []

    async def side(partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        asked.append(partitions)
        return {tp: 20 for tp in partitions}

    await LagReporter(_FixedConsumer(), metrics, end_offsets=side).update([TP])
    assert asked == [[TP]]
    assert metrics.consumer_lag.labels(TP.topic, "0")._value.get() == 12


class _SlowStartClient(_SideClient):
    """Its start takes a few loop turns, as a real connection does."""

    async def start(self) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        await super().start()


async def test_two_first_calls_at_once_start_one_client() -> None:
    # the lag loop and a rebalance's careful start may both be the first caller
    log: list[str] = []
    made: list[_SideClient] = []

    def make() -> _SideClient:
        made.append(_SlowStartClient(failures=0, log=log))
        return made[-1]

    ends = EndOffsets(make)
    both = await asyncio.gather(ends([TP]), ends([TP]))
    assert both == [{TP: 7}, {TP: 7}]
    assert len(made) == 1 and log.count("start") == 1
    await ends.close()
    assert log.count("stop") == 1  # no second client left running
