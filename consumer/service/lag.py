"""The consumer-lag metric: records behind the end of each assigned partition."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Iterable
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from consumer.service.metrics import Metrics

log = logging.getLogger(__name__)

_LAG_TIMEOUT_S = 5.0


class LagReporter:
    """Sets ``rerank_consumer_lag{topic,partition}`` from the broker's end offsets."""

    def __init__(
        self,
        consumer: Any,
        metrics: Metrics,
        first_waiting: Callable[[TopicPartition], int | None] = lambda tp: None,
    ) -> None:
        """``first_waiting``: a partition's first record taken from the consumer but not
        started (the worker's lookahead), which counts as lag: it waits."""
        self._consumer = consumer
        self._metrics = metrics
        self._first_waiting = first_waiting

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
        ends = await self._consumer.end_offsets(list(partitions))
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
