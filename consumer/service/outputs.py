"""What answering a request produces, and the one interface that writes it to Kafka.

Every answer becomes :class:`OutputRecord` values (a reply, or a dead-letter record) sent
through a :class:`Sender`. The delivery mode decides what sending means: produced and
acknowledged now (at-least-once), or kept for the source partition's next transaction
(exactly-once). Tracing wraps a sender without knowing which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka.structs import ConsumerRecord

Headers = Sequence[tuple[str, bytes | None]]  # a header's value may be null


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One record to produce because of a request.

    ``error_code`` is the error the record carries (an error reply's code, or a
    dead-letter record's), None for a success reply; ``dead_letter`` says which topic
    role it has. Both only describe the record (metrics, tracing); they are not sent.
    ``smaller``: what goes instead when Kafka refuses this record as too large (a
    success reply: a ``payload_too_large`` error reply; a dead-letter copy: one without
    the value), for senders that learn of the refusal only later (a transaction).
    """

    topic: str
    partition: int | None
    key: bytes | None
    value: bytes | None
    headers: Headers
    error_code: str | None = None
    dead_letter: bool = False
    smaller: OutputRecord | None = None

    @property
    def size(self) -> int:
        """Bytes of key, value and headers: what counts against Kafka's record limits."""
        headers = sum(len(name) + len(value or b"") for name, value in self.headers)
        return len(self.key or b"") + len(self.value or b"") + headers


class Sender(Protocol):
    """How an output of the request record ``source`` reaches Kafka."""

    async def send(self, source: ConsumerRecord[Any, Any], output: OutputRecord) -> None:
        """Return once ``output`` is as good as written (acknowledged, or kept for the
        source partition's transaction); raise the producer's error otherwise."""
        ...
