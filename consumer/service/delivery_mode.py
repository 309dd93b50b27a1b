"""The delivery guarantee as one strategy the worker holds: how answers reach Kafka, how
finished work is committed, and what a mode does when partitions come and go.

* :class:`consumer.service.at_least_once.AtLeastOnce` (the default): a reply is produced
  and acknowledged the moment its request is answered; offsets follow. A crash can repeat
  replies (the SDK drops duplicates).
* :class:`consumer.service.exactly_once.ExactlyOnce`: replies wait in their partition's
  outbox and commit with the offset in one Kafka transaction per partition.

The worker calls the hooks below and never asks which mode it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from aiokafka.structs import TopicPartition

from consumer.service.at_least_once import AtLeastOnce
from consumer.service.attempts import Head
from consumer.service.commit_policy import CommitPolicy
from consumer.service.exactly_once import ExactlyOnce
from consumer.service.membership import StallGuard
from consumer.service.metrics import Metrics
from consumer.service.outputs import Sender
from consumer.service.worker_config import WorkerConfig


class DeliveryMode(Protocol):
    """What a delivery guarantee provides to the worker."""

    @property
    def sender(self) -> Sender:
        """Where every reply and dead-letter record goes."""
        ...

    @property
    def committer(self) -> CommitPolicy:
        """How finished prefixes (and attempt counts) are committed."""
        ...

    async def set_up(self, assigned: set[TopicPartition]) -> dict[TopicPartition, Head]:
        """Get newly ``assigned`` partitions ready; their committed heads (partitions
        with no committed offset have none)."""
        ...

    def set_up_plainly(self, assigned: set[TopicPartition]) -> None:
        """What a failed :meth:`set_up` left out, done without asking the broker."""
        ...

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """``partitions`` are gone (after their last commit, or lost)."""
        ...

    def not_ready_reasons(self) -> list[str]:
        """Why answers cannot reach Kafka now; empty when they can."""
        ...

    def waiting(self, tp: TopicPartition) -> int:
        """Answers of ``tp`` held in memory until a commit (they count in its backlog)."""
        ...

    def full(self) -> bool:
        """True while the answers held in memory are all the mode may hold."""
        ...

    def on_commits(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after commits that may have let held answers go."""
        ...

    async def close(self) -> None:
        """Stop whatever the mode started."""
        ...


def delivery_mode(
    config: WorkerConfig,
    consumer: Any,
    producer: Any,
    metrics: Metrics,
    membership_lost: Callable[[], bool],
    on_fatal: Callable[[Exception], None] = lambda error: None,
    guard: StallGuard | None = None,
) -> DeliveryMode:
    """The mode ``config.delivery`` names, over the worker's started clients;
    ``on_fatal`` stops the worker (what only an operator can fix); ``guard`` holds
    at-least-once sends after a stall (exactly-once's zombie is fenced instead)."""
    if config.exactly_once:
        return ExactlyOnce(config, consumer, metrics, membership_lost, on_fatal)
    return AtLeastOnce(config, consumer, producer, membership_lost, guard)
