"""The consumer-lag metric: records behind the end of each assigned partition."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from consumer.service.metrics import Metrics

log = logging.getLogger(__name__)

_LAG_TIMEOUT_S = 5.0


EndOffsetsFn = Callable[[list[TopicPartition]], Awaitable[Mapping[TopicPartition, int]]]


class EndOffsets:
    """Partitions' end offsets from a client of their own, started at first use.

    ``make_client()`` returns an unstarted aiokafka consumer (no group). A start that
    fails is tried again at the next call.
    """

    def __init__(self, make_client: Callable[[], Any]) -> None:
        self._make_client = make_client
        self._client: Any = None
        # the lag loop and a rebalance may both be first: one client, started once
        self._starting = asyncio.Lock()

    async def __call__(self, partitions: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        client = await self._started_client()
        ends: Mapping[TopicPartition, int] = await client.end_offsets(partitions)
        return ends

    async def _started_client(self) -> Any:
        async with self._starting:
            if self._client is None:
                client = self._make_client()
                try:
                    await client.start()
                except BaseException:
                    await client.stop()
                    raise
                self._client = client
            return self._client

    async def close(self) -> None:
        """Stop the client, if it started."""
        client, self._client = self._client, None
        if client is not None:
            await client.stop()


class LagReporter:
    """Sets ``rerank_consumer_lag{topic,partition}`` from the broker's end offsets."""

    def __init__(
        self,
        consumer: Any,
        metrics: Metrics,
        first_waiting: Callable[[TopicPartition], int | None] = lambda tp: None,
        end_offsets: EndOffsetsFn | None = None,
    ) -> None:
        """``first_waiting``: a partition's first record taken from the consumer but not
        started (the worker's lookahead), which counts as lag: it waits. ``end_offsets``:
        where the ends come from (default: ``consumer.end_offsets``; the worker passes an
        :class:`EndOffsets`, whose connection no fetch long-poll holds up)."""
        self._consumer = consumer
        self._metrics = metrics
        self._first_waiting = first_waiting
        self._end_offsets: EndOffsetsFn = end_offsets or consumer.end_offsets

    async def run(
        self,
        interval_s: float,
        assigned: Callable[[], Collection[TopicPartition]],
        every_round: Callable[[], Any] | None = None,
    ) -> None:
        """Refresh the lag every ``interval_s`` until cancelled; ``every_round`` is
        awaited first each time (the worker re-checks missing topics there)."""
        while True:
            await asyncio.sleep(interval_s)
            if every_round is not None:
                await every_round()
            try:
                async with asyncio.timeout(_LAG_TIMEOUT_S):
                    await self.update(assigned())
            except (KafkaError, TimeoutError) as exc:
                log.debug("lag update failed", extra={"error": repr(exc)})

    async def update(self, partitions: Collection[TopicPartition]) -> None:
        """Set the lag of ``partitions`` now."""
        if not partitions:
            return
        # end_offsets asks the broker: a paused partition's fetch highwater would be stale.
        ends = await self._end_offsets(list(partitions))
        for tp in partitions:
            try:
                position = await self._consumer.position(tp)
            except (KafkaError, AssertionError):  # revoked meanwhile
                continue
            waiting = self._first_waiting(tp)
            if waiting is not None:
                position = min(position, waiting)
            lag = max(0, ends[tp] - position)
            self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the lag series of partitions no longer assigned."""
        for tp in partitions:
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))
