"""The units of work the engine's parts hand each other.

A :class:`PendingRequest` (event-loop side) owns one :class:`Ticket` per pair; tickets
wait in the batcher, are cut into a :class:`Batch` by the batch former, scored by the
inference thread, and come back to the loop as an :class:`Outcome`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from consumer.engine.api import BatchTiming, EngineError
from consumer.runtime.prompt import EncodedPair


class PendingRequest:
    """Loop-side state of one request; mutated only on the event loop thread."""

    __slots__ = (
        "batches",
        "deadline",
        "done",
        "enqueued",
        "finished",
        "future",
        "logits",
        "remaining",
        "scores",
        "tickets",
    )

    def __init__(
        self, future: asyncio.Future[None], pairs: Sequence[EncodedPair], deadline: float | None
    ) -> None:
        self.future = future
        self.deadline = deadline
        self.logits = [0.0] * len(pairs)
        self.scores = [0.0] * len(pairs)
        self.remaining = len(pairs)
        # Read without a lock by the worker threads: at worst they score a pair whose
        # request was just given up, and its result is ignored.
        self.done = False
        self.enqueued = time.perf_counter()
        self.finished = self.enqueued
        self.batches: dict[int, BatchTiming] = {}
        self.tickets = [
            Ticket(pair, self, i, pair.tokens, deadline, self.enqueued)
            for i, pair in enumerate(pairs)
        ]


@dataclass(eq=False, slots=True)
class Ticket:
    """One queued pair (a :class:`consumer.engine.batcher.BatchItem`)."""

    pair: EncodedPair
    request: PendingRequest
    index: int
    tokens: int
    deadline: float | None
    enqueued: float


@dataclass(eq=False)
class Batch:
    """Tickets cut into one batch, with the scorer's prepared inputs (None: not built).

    ``cost`` is the batcher's cost of the batch as cut; ``prepare_s`` how long preparing
    its inputs took (both for :mod:`consumer.engine.pacing`).
    """

    tickets: list[Ticket]
    prepared: object | None = None
    cost: int = 0
    prepare_s: float = 0.0


@dataclass(eq=False)
class Outcome:
    """Results of one model call (or one error) for the loop to hand out."""

    tickets: list[Ticket]
    logits: Sequence[float] = ()
    scores: Sequence[float] = ()
    error_type: type[EngineError] | None = None
    error_message: str = ""
    batch: BatchTiming | None = None  # set on success


def failure(tickets: list[Ticket], error_type: type[EngineError], message: str) -> Outcome:
    """An outcome that fails every request of ``tickets`` with ``error_type(message)``."""
    return Outcome(tickets, error_type=error_type, error_message=message)


# How a worker thread hands an outcome to the event loop.
Post = Callable[[Outcome], None]
