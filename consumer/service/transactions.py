"""Exactly-once replies: each partition's replies, dead-letter records and offsets in one
Kafka transaction.

In this mode (``delivery = exactly_once``) nothing is produced the moment a request is
answered: its reply (or dead-letter record) waits in its partition's outbox. Every
``commit_interval_s`` each partition with a finished prefix commits one transaction
holding the outputs of exactly that prefix and the offset past it. A reader with
``isolation.level=read_committed`` then sees every reply once: a worker that dies
before the commit leaves the transaction to be aborted, and the new owner answers the
same records again in a transaction of its own.

Fencing: the transactional id is the partition's (``<prefix>.<group>.<topic>.<partition>``),
so the producer of whoever owns a partition now fences the producer of whoever owned it
before (``init_transactions`` bumps the epoch and aborts its open transaction). A zombie
(a worker paused past its session timeout that wakes up) cannot commit anything: its
first transaction fails as fenced, and a fenced partition is never tried again.

Every producer's first transaction checks what is committed already. Its
``init_transactions`` returns only once the last transaction of the same transactional
id is finished, and that may have been a commit nobody here saw succeed:

- a transaction of this worker that failed otherwise (the broker away, a timeout) leaves
  the producer in an unknown state; it is replaced by a fresh one, and the failed commit
  may have gone through with its answer lost;
- a partition's new owner: its consumer read the committed offset when the partition
  was assigned (aiokafka fetches it before the assignment callback even runs), and a
  broker hides offsets of a transaction still being committed from a reader that does
  not ask for stable offsets, as aiokafka never does (KIP-447's ``require_stable``). The
  last owner's final commit can thus be missed: the new owner starts below it and
  answers those records again.

A fresh producer fences too, so a worker starts one for a partition it has had for a
while (after a transaction failed otherwise) only once the group coordinator confirms
that it is still a member with that partition (``confirm_membership``,
:mod:`consumer.service.membership`). A zombie's local state says it still is: without
asking, its fresh producer would fence the partition's real owner, whose transactions
would then fail until the next rebalance, and the zombie's own transaction could commit
the group's offset (a transaction's offset commit is not checked against the group's
generation).

So once the producer has its id, the group's committed offset is read, and from then on
nothing below it is produced or committed: outbox entries below it (answered and visible
already) are dropped, resending them would duplicate replies, and a commit below it
would move the group's offset back. The worker also reads each new partition's
committed offset once its producer has its id, and its consumer fetches from there
(:meth:`consumer.service.exactly_once.ExactlyOnce.set_up`), so a new owner does not
score those records again; should it start below the offset all the same (the read
failed), its answers to them are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.structs import TopicPartition

from consumer.service.outputs import OutputRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

TXN_TIMEOUT_S = 10.0
# What a transaction or a producer's start may fail with, leaving the producer to be
# replaced. aiokafka asserts too: a producer started just as the broker comes back, with
# metadata that lists no broker, fails ``assert node_id is not None, "Did we not perform
# bootstrap?"`` (seen in the chaos suite after a broker freeze).
PRODUCER_FAILURES = (KafkaError, TimeoutError, OSError, AssertionError)


@dataclass
class PartitionTransactions:
    """The transactional producer and the outbox of one partition assignment."""

    tp: TopicPartition
    make_producer: Callable[[], Any]
    group_id: str
    # the group's committed offset of this partition (None: nothing committed yet)
    read_committed: Callable[[], Awaitable[int | None]]
    # asks the group coordinator whether this worker still has the partition
    # (consumer.service.membership.confirm_membership); False: not now
    confirm_membership: Callable[[], Awaitable[bool]]
    # source offset -> what answering it produced (a reply or a dead-letter record)
    outbox: dict[int, list[OutputRecord]] = field(default_factory=dict)
    fenced: bool = False
    broken: bool = False  # the last transaction failed: a fresh producer first
    # the group's committed offset, read once this producer had its id (module
    # docstring): nothing below it is produced or committed; None: not read yet
    floor: int | None = None
    producer: Any = None
    # bytes of every record in the outbox (it is memory the worker holds)
    outbox_bytes: int = 0
    # since when (time.monotonic()) transactions have failed; None: the last one went
    failing_since: float | None = None
    # the broker refused this worker's principal the transactional id (or the cluster):
    # only an operator can fix that
    unauthorized: KafkaError | None = None

    async def start(self) -> None:
        """Start a producer: this fences every earlier producer of the partition."""
        self.floor = None
        self.producer = self.make_producer()
        try:
            await bounded(self.producer.start(), TXN_TIMEOUT_S)
        except PRODUCER_FAILURES as exc:
            self._failed(exc)
            raise

    async def stop(self) -> None:
        await _stop(self.producer)

    def put(self, offset: int, output: OutputRecord) -> None:
        """Keep what answering the record at ``offset`` produced, for its transaction."""
        self.outbox.setdefault(offset, []).append(output)
        self.outbox_bytes += output.size

    async def commit(self, upto: int, metadata: str = "") -> bool:
        """One transaction: the outputs of every offset below ``upto`` and the offset
        ``upto`` (with ``metadata``) for the group. False (nothing visible) on failure."""
        if self.fenced:
            return False
        try:
            if self.broken:
                if not await self._still_the_owner():
                    return False
                await self._renew()
            if self.floor is None:
                self.floor = await self._read_floor()
            self._drop_below(self.floor)
            if upto < self.floor:
                # a finished transaction committed past it already; committing it would
                # move the group's offset back (at the floor itself it may carry metadata:
                # an attempt count, consumer.service.attempts)
                return True
            offsets = sorted(o for o in self.outbox if o < upto)
            await bounded(self._transaction(offsets, upto, metadata), TXN_TIMEOUT_S)
        except ProducerFenced:
            self.fenced = True
            log.warning(
                "partition taken over by another worker: its transaction was fenced",
                extra={"partitions": [self._name]},
            )
            return False
        except PRODUCER_FAILURES as exc:
            self.broken = True
            self._failed(exc)
            log.warning(
                "transaction failed; the outbox is committed again with a fresh producer",
                extra={"error": repr(exc), "partitions": [self._name]},
            )
            return False
        self._remove(offsets)
        self.failing_since = None
        return True

    def _failed(self, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        refusal = _authorization_error(exc, self.producer)
        if refusal is not None:
            self.unauthorized = refusal

    def _remove(self, offsets: Iterable[int]) -> None:
        for offset in offsets:
            self.outbox_bytes -= sum(out.size for out in self.outbox.pop(offset))

    @property
    def _name(self) -> str:
        return f"{self.tp.topic}-{self.tp.partition}"

    async def _transaction(self, offsets: list[int], upto: int, metadata: str) -> None:
        # begin/commit by hand, not the library's context manager: aborting a transaction
        # of a producer in trouble can wait forever; a failed one is left to the next
        # producer of this transactional id, which aborts it
        producer = self.producer
        await producer.begin_transaction()
        sent: list[tuple[list[OutputRecord], int, Awaitable[Any]]] = []
        for offset in offsets:  # enqueued in order; acknowledged together
            outputs = self.outbox[offset]
            for index, out in enumerate(outputs):
                sent.append((outputs, index, await _send(producer, out)))
        results = await asyncio.gather(*(ack for _, _, ack in sent), return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        for (outputs, index, _), result in zip(sent, results, strict=True):
            if isinstance(result, _TOO_LARGE):
                self._make_smaller(outputs, index, result)
        if failures:
            raise failures[0]
        await producer.send_offsets_to_transaction({self.tp: (upto, metadata)}, self.group_id)
        await producer.commit_transaction()

    def _make_smaller(self, outputs: list[OutputRecord], index: int, error: Exception) -> None:
        """The broker refused ``outputs[index]`` as too large: its smaller stand-in goes
        in the next transaction (this one fails: a transaction commits all or nothing)."""
        out = outputs[index]
        if out.smaller is None:
            return  # a pointer that does not fit: the next transaction fails the same way
        log.warning(
            "a record of the transaction was too large for Kafka; the next one sends a "
            "smaller stand-in",
            extra={"partitions": [self._name], "error": repr(error), "bytes": out.size},
        )
        outputs[index] = out.smaller
        self.outbox_bytes += out.smaller.size - out.size

    async def _still_the_owner(self) -> bool:
        if await bounded(self.confirm_membership(), TXN_TIMEOUT_S):
            return True
        log.warning(
            "not starting a fresh transactional producer: the group coordinator did not "
            "confirm that this worker still has the partition",
            extra={"partitions": [self._name]},
        )
        return False

    async def _renew(self) -> None:
        """A fresh producer for the same transactional id (the old one is let go)."""
        old = self.producer
        asyncio.get_running_loop().create_task(_stop(old))  # it may hang: never wait for it
        await self.start()
        self.broken = False

    async def _read_floor(self) -> int:
        """The group's committed offset once every earlier transaction of this
        transactional id is finished (0: none committed)."""
        # The producer id arrives once the last transaction is committed or aborted.
        await bounded(self.producer._txn_manager.wait_for_pid(), TXN_TIMEOUT_S)
        committed = await bounded(self.read_committed(), TXN_TIMEOUT_S)
        return committed if committed is not None else 0

    def _drop_below(self, offset: int) -> None:
        self._remove([o for o in self.outbox if o < offset])


_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
# Refusals only an operator can fix: the transactional id's ACLs, or the cluster's.
UNAUTHORIZED = (
    TransactionalIdAuthorizationFailed,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
)


def _authorization_error(exc: BaseException, producer: Any) -> KafkaError | None:
    """The authorization refusal behind a failure, if it was one: raised, or what ended
    the producer's sender (a refused InitProducerId ends it, and waiting for the
    producer id then only times out)."""
    if isinstance(exc, UNAUTHORIZED):
        return exc
    sender = getattr(getattr(producer, "_sender", None), "sender_task", None)
    if sender is not None and sender.done() and not sender.cancelled():
        ended = sender.exception()
        if isinstance(ended, UNAUTHORIZED):
            return ended
    return None


async def _send(producer: Any, out: OutputRecord) -> Awaitable[Any]:
    """Enqueue ``out`` in the open transaction; its ack, which raises a too-large refusal
    whether the producer (at once) or the broker (later) makes it."""
    try:
        return await producer.send(
            out.topic, value=out.value, key=out.key, partition=out.partition, headers=out.headers
        )
    except _TOO_LARGE as exc:
        refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refused.set_exception(exc)
        return refused


async def _stop(producer: Any) -> None:
    if producer is None:
        return
    try:
        await bounded(producer.stop(), TXN_TIMEOUT_S)
    except Exception:
        log.debug("stopping a transactional producer failed", exc_info=True)


async def bounded(work: Awaitable[T], seconds: float) -> T:
    """``work`` in a task of its own, given up after ``seconds`` even if it ignores being
    cancelled: then TimeoutError, and the task is cancelled and left to end on its own.

    A cancel-based timeout (``asyncio.timeout``) waits for the cancelled work to give
    in. A producer in trouble may not: an exactly-once worker in the chaos suite stopped
    committing for minutes after a broker freeze, with no transaction ever timing out.
    This bound holds whatever the work does with its cancellation.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_forget)
        raise TimeoutError(f"gave up after {seconds:g} s")
    return task.result()


def _forget(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a late failure of abandoned work is not news
