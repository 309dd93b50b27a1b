"""The fetch loop: poll the consumer, let in what fits, oldest first when room is short.

The loop keeps calling ``getmany`` (so heartbeats and the poll interval never lapse while
the model is busy) and hands each record to the intake (:mod:`consumer.service.intake`).
While everything it takes fits below the in-flight high mark it polls plainly; else it
moves what the consumer fetched into the lookahead and lets records in oldest first
across partitions (:mod:`consumer.service.oldest_first`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.service.failures import NotAuthorized
from consumer.service.intake import Intake
from consumer.service.membership import StallGuard
from consumer.service.oldest_first import Lookahead
from consumer.service.partitions import PartitionWork

log = logging.getLogger(__name__)

# Failures that only an operator can fix (ACLs, credentials): stop instead of retrying.
NOT_AUTHORIZED_ERRORS = (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
POLL_TIMEOUT_MS = 200
_FETCH_ERROR_BACKOFF_S = 1.0

Batches = dict[TopicPartition, list[ConsumerRecord[Any, Any]]]


class FetchLoop:
    """Polls the consumer and lets records in until told to stop."""

    def __init__(
        self,
        consumer: Any,
        intake: Intake,
        partitions: dict[TopicPartition, PartitionWork],
        lookahead: Lookahead,
        max_poll_records: int,
        guard: StallGuard | None = None,
    ) -> None:
        """``guard``: after a stall, nothing is fetched before the group confirms the
        worker is still a member (the poll that follows rejoins when it is not)."""
        self._consumer = consumer
        self._guard = guard
        self._intake = intake
        self._partitions = partitions
        self._lookahead = lookahead
        self._max_poll_records = max_poll_records
        self.polling = False
        self._last_poll = time.monotonic()
        self.error: str | None = None  # the last fetch failure, until a poll succeeds

    @property
    def seconds_since_poll(self) -> float:
        """Seconds since the loop last polled Kafka (0 while a poll is waiting)."""
        return 0.0 if self.polling else time.monotonic() - self._last_poll

    async def run(self, stop_requested: Callable[[], bool]) -> None:
        """Poll and let records in until ``stop_requested()``; a cancel that comes while a
        poll waits ends the loop (nothing is taken before ``getmany`` returns)."""
        while not stop_requested():
            self.polling = True
            try:
                if self._guard is not None:
                    await self._guard.cleared()
                batches = await self._poll()
            except asyncio.CancelledError:
                if stop_requested():
                    return
                raise
            except NOT_AUTHORIZED_ERRORS as exc:
                raise NotAuthorized(
                    f"not authorized: {exc}; this worker's principal lacks an ACL "
                    "(docs/operations.md, Kafka ACLs)"
                ) from exc
            except KafkaError as exc:
                self.polling = False
                self._last_poll = time.monotonic()
                self._on_error(exc)
                await asyncio.sleep(_FETCH_ERROR_BACKOFF_S)
                continue
            finally:
                self.polling = False
            self._last_poll = now = time.monotonic()
            self.error = None
            await self._let_in(batches, now)
            self._intake.apply_flow()

    async def _let_in(self, batches: Batches, now: float) -> None:
        consumer = self._consumer
        for tp, records in batches.items():
            work = self._partitions.get(tp)
            if work is None:
                if tp in consumer.assignment():
                    # assigned, its set-up still running: fetch these again later
                    self._lookahead.rewind(consumer, tp, records[0].offset)
                continue  # else revoked meanwhile: the new owner fetches these
            for record in records:
                if self._intake.holds_back():
                    # working carefully: one record at a time; the rest is fetched again
                    self._lookahead.rewind(consumer, tp, record.offset)
                    break
                if not await self._intake.accept(tp, work, record, now):
                    break  # revoked meanwhile: the new owner fetches the rest

    async def _poll(self) -> Batches:
        """One poll's records: a plain poll while all it takes fits below the high mark,
        else oldest first across partitions (:mod:`consumer.service.oldest_first`)."""
        consumer = self._consumer
        size = self._intake.poll_size()
        if size >= self._max_poll_records and not self._lookahead.holding():
            return await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=size)
        resumed = self._intake.resumed
        resumed.clear()
        await self._lookahead.refill(consumer, self._open_partitions())
        taken = self._lookahead.take(size, self._open_partitions())
        if taken:
            return taken
        if self._open_partitions():
            fetched = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=size)
        else:
            # Every partition is paused and records wait in the lookahead, which a poll of
            # the consumer would not see come free: wait for a resume instead.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_TIMEOUT_MS / 1000):
                    await resumed.wait()
            fetched = await consumer.getmany(max_records=size)  # a poll all the same
        self._lookahead.add(fetched)
        return self._lookahead.take(self._intake.poll_size(), self._open_partitions())

    def _open_partitions(self) -> set[TopicPartition]:
        """Partitions whose records may be let in now: set up and not paused."""
        consumer = self._consumer
        return (consumer.assignment() - consumer.paused()) & self._partitions.keys()

    def _on_error(self, exc: KafkaError) -> None:
        message = repr(exc)
        if message != self.error:
            log.error("fetching requests failed", extra={"error": message})
        self.error = message
