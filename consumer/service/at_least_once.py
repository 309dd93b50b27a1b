"""At-least-once delivery: produce each answer now, wait for the broker's ack, commit the
offsets of every finished prefix afterwards.

A worker that dies between an ack and the commit after it leaves those requests to be
answered again by the partition's next owner: replies can repeat, never go missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.service.attempts import Head, read_heads
from consumer.service.commit_policy import CommitPolicy, OffsetCommitter
from consumer.service.membership import StallGuard
from consumer.service.outputs import OutputRecord, Sender
from consumer.service.worker_config import WorkerConfig


class AckedSender:
    """Produce now and wait for the broker's ack (acks=all).

    With a ``guard``, nothing is sent by a worker that no longer is a member of its group
    after a stall: the request is given up as a cancelled one is (it stays uncommitted,
    and the partition's new owner answers it).
    """

    def __init__(self, producer: Any, guard: StallGuard | None = None) -> None:
        self._producer = producer
        self._guard = guard

    async def send(self, source: ConsumerRecord[Any, Any], output: OutputRecord) -> None:
        """Send one record and wait for the broker's ack."""
        if self._guard is not None and not await self._guard.cleared():
            raise asyncio.CancelledError
        ack = await self._producer.send(
            output.topic,
            value=output.value,
            key=output.key,
            partition=output.partition,
            headers=output.headers,
        )
        await ack


class AtLeastOnce:
    """The default delivery mode (see the module docstring)."""

    def __init__(
        self,
        config: WorkerConfig,
        consumer: Any,
        producer: Any,
        membership_lost: Callable[[], bool],
        guard: StallGuard | None = None,
    ) -> None:
        self._consumer = consumer
        self._sender = AckedSender(producer, guard)
        self._committer = OffsetCommitter(consumer, config.commit_interval_s, membership_lost)

    @property
    def sender(self) -> Sender:
        return self._sender

    @property
    def committer(self) -> CommitPolicy:
        return self._committer

    async def set_up(self, assigned: set[TopicPartition]) -> dict[TopicPartition, Head]:
        return await read_heads(self._consumer, assigned)

    def set_up_plainly(self, assigned: set[TopicPartition]) -> None:
        pass  # nothing of its own per partition

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        pass

    def not_ready_reasons(self) -> list[str]:
        return []

    def waiting(self, tp: TopicPartition) -> int:
        return 0  # produced at once: nothing held

    def full(self) -> bool:
        return False

    def on_commits(self, callback: Callable[[], None]) -> None:
        pass

    async def close(self) -> None:
        pass  # the worker's producer is the worker's to stop
