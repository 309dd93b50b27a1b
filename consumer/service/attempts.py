"""Counting how often a record was started and never finished: poison records.

A record that kills the process (a crash in a native library, the kernel's
out-of-memory killer) would be redelivered forever, moving from worker to worker after
each rebalance. Kafka keeps a small metadata string with every committed offset; the
worker keeps there how many times the record *at* the committed position was started:

* before it processes the record at its partition's committed position, a worker
  commits that same position with the count plus one;
* finishing it moves the committed position past it, with a count of zero.

So a count of one or more at assignment means the last owner started that record and
never got past it (it died, or was revoked mid-record). The new owner then works
*carefully*: one record at a time across all its partitions, committing after each,
until it is past every such record; a crash in careful mode is the fault of the one
record in flight. A record whose count reaches ``max_record_attempts`` is not processed
again: it goes to the dead-letter topic (``error-code: poison_record``), and its client,
if the record names one, gets an ``internal`` error reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

log = logging.getLogger(__name__)

_READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Head:
    """A partition's committed position and how often its record was started there."""

    offset: int
    attempts: int


def encode_attempts(attempts: int) -> str:
    """The commit metadata that records ``attempts``."""
    return json.dumps({"attempts": attempts}, separators=(",", ":"))


def decode_attempts(metadata: str | None) -> int:
    """Attempts recorded in commit metadata; 0 for none, or metadata of someone else's."""
    if not metadata:
        return 0
    try:
        value = json.loads(metadata)
    except ValueError:
        return 0
    attempts = value.get("attempts") if isinstance(value, dict) else None
    return attempts if isinstance(attempts, int) and attempts >= 0 else 0


async def read_heads(
    consumer: Any, partitions: Collection[TopicPartition]
) -> dict[TopicPartition, Head]:
    """The committed position and attempt count of each partition that has one.

    On failure (broker away), no heads: the worker then counts from zero, which can only
    delay a poison record's detection, never dead-letter a good one.
    """
    if not partitions:
        return {}
    try:
        committed = await _fetch_committed(consumer, partitions)
    except (KafkaError, TimeoutError) as exc:
        log.warning("could not read the committed attempt counts", extra={"error": repr(exc)})
        return {}
    return {
        tp: Head(int(meta.offset), decode_attempts(meta.metadata)) for tp, meta in committed.items()
    }


async def read_committed_offset(consumer: Any, tp: TopicPartition) -> int | None:
    """The group's committed offset of ``tp`` (None: none yet); raises when unreadable."""
    committed = await _fetch_committed(consumer, [tp])
    return int(committed[tp].offset) if tp in committed else None


async def _fetch_committed(consumer: Any, partitions: Collection[TopicPartition]) -> Any:
    # aiokafka's public committed() drops the metadata and hides read errors; its
    # coordinator returns both and raises.
    coordinator = consumer._coordinator
    async with asyncio.timeout(_READ_TIMEOUT_S):
        return await coordinator.fetch_committed_offsets(list(partitions))
