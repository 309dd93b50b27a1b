"""Letting fetched records in, and pausing exactly the partitions that must wait.

A record let in is registered with its partition's offsets, counted in the pair gate
(:mod:`consumer.service.backpressure`) and answered in a task of its own; once that task
has delivered the answer, the record's offset is finished and a commit follows. The
careful start (:mod:`consumer.service.careful`) decides what a record needs before it
runs.

Flow control: above the gate's high mark every assigned partition is paused; below its
low mark they resume. A partition is also paused on its own while it is held
(:mod:`consumer.service.partitions`), and every partition while a careful start has a
record in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeAlias

from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.service.backpressure import PairGate
from consumer.service.careful import CarefulStart
from consumer.service.commit_policy import CommitPolicy
from consumer.service.context import coordinates
from consumer.service.delivery_mode import DeliveryMode
from consumer.service.metrics import Metrics
from consumer.service.partitions import Hold, PartitionWork
from consumer.service.processing import Job, Processor
from consumer.service.worker_config import WorkerConfig

log = logging.getLogger(__name__)

Record: TypeAlias = "ConsumerRecord[Any, Any]"


class Intake:
    """The records in flight, the pair gate, and which partitions are paused."""

    def __init__(
        self,
        config: WorkerConfig,
        partitions: dict[TopicPartition, PartitionWork],
        careful: CarefulStart,
        metrics: Metrics,
        lookahead_size: Callable[[], int] = lambda: 0,
    ) -> None:
        """``partitions``: the worker's assigned partitions and their work (shared);
        ``lookahead_size``: records taken from the consumer and not yet let in."""
        self._config = config
        self._partitions = partitions
        self._careful = careful
        self._metrics = metrics
        self._lookahead_size = lookahead_size
        self.gate = PairGate(
            config.inflight_high_pairs,
            config.inflight_low_pairs,
            config.inflight_target_s,
            config.inflight_min_pairs,
        )
        self.tasks: set[asyncio.Task[bool]] = set()
        self.resumed = asyncio.Event()  # set when partitions resume or are set up
        self._pairs_per_record = 1.0  # running average, sizes each poll to the room left
        self._consumer: Any = None
        self._processor: Processor | None = None
        self._mode: DeliveryMode | None = None

    def bind(self, consumer: Any, processor: Processor, mode: DeliveryMode) -> None:
        """The parts that exist once the worker's clients have started."""
        self._consumer = consumer
        self._processor = processor
        self._mode = mode
        mode.on_commits(self._after_commits)

    def poll_size(self) -> int:
        """Records to take in one poll: about what fits below the high mark (one at a time
        while working carefully).

        Taking a whole poll's worth regardless would overshoot the mark by up to
        ``max_poll_records`` requests; one request's worth is the most it overshoots now.
        """
        fits = int(self.gate.room / self._pairs_per_record)
        return self._careful.poll_size(max(1, min(self._config.max_poll_records, fits)))

    def holds_back(self) -> bool:
        """True while no new record may start (a careful start has one in flight)."""
        return self._careful.holds_back(len(self.tasks))

    async def accept(
        self, tp: TopicPartition, work: PartitionWork, record: Record, received: float
    ) -> bool:
        """Start answering ``record``; False when its partition was revoked meanwhile."""
        processor, mode = self._processor, self._mode
        assert processor is not None and mode is not None, "bind() first"
        step = self._careful.step(work, record.offset)
        if step.count_attempt is not None:
            attempt = (record.offset, step.count_attempt)
            if await mode.committer.commit_attempt(tp, work, *attempt):
                work.counted = attempt
            if self._partitions.get(tp) is not work:
                return False
        work.offsets.register(record.offset)
        self._limit_backlog(tp, work)
        if step.poison_attempts is not None:
            job = processor.give_up(record, step.poison_attempts, received)
        else:
            job = processor.start(record, received)
        self._run(tp, work, job)
        return True

    def _run(self, tp: TopicPartition, work: PartitionWork, job: Job) -> None:
        weight = job.context.weight
        self.gate.add(weight)
        self._pairs_per_record += (weight - self._pairs_per_record) * 0.1
        task = asyncio.create_task(job.run)
        self.tasks.add(task)
        work.tasks.add(task)
        task.add_done_callback(partial(self._finished, tp, work, job, weight))

    def _finished(
        self,
        tp: TopicPartition,
        work: PartitionWork,
        job: Job,
        weight: int,
        task: asyncio.Task[bool],
    ) -> None:
        self.tasks.discard(task)
        work.tasks.discard(task)
        self.gate.remove(weight, answered=not task.cancelled())
        record = job.context.record
        if task.cancelled():
            pass  # given up (rebalance, drain timeout): stays uncommitted, redelivered
        elif (exc := task.exception()) is not None:
            # Processing dead-letters a record whose answering failed, so this is a bug in
            # that fallback itself: keep the offset unfinished (commits of this partition
            # stop here, so the request is redelivered rather than lost) and say so loudly.
            log.error(
                "request processing failed",
                exc_info=exc,
                extra=coordinates(record) | {"correlation_id": job.context.correlation_id},
            )
        elif task.result():
            work.offsets.done(record.offset)
            self._limit_backlog(tp, work)
            self._careful.finished(tp, work)
            if self._mode is not None:
                self._mode.committer.progress()
        # else: not answered (the engine failed): stays uncommitted for another worker
        self.apply_flow()

    def _limit_backlog(self, tp: TopicPartition, work: PartitionWork) -> None:
        waiting = self._mode.waiting(tp) if self._mode is not None else 0
        work.limit_backlog(self._config.max_uncommitted_records, waiting)

    def _after_commits(self) -> None:
        """Commits let answers held for them go: backlogs may be under their cap again."""
        for tp, work in self._partitions.items():
            self._limit_backlog(tp, work)
        self.apply_flow()

    def on_dead_letter_blocked(self, tp: TopicPartition, blocked: bool) -> None:
        """Hold ``tp`` while one of its records cannot be dead-lettered."""
        work = self._partitions.get(tp)
        if work is None:  # revoked meanwhile
            return
        if blocked:
            work.hold(Hold.DEAD_LETTER_BLOCKED)
        else:
            work.release(Hold.DEAD_LETTER_BLOCKED)
        self.apply_flow()

    def apply_flow(self) -> None:
        """Pause exactly the partitions that must not be fetched from; resume the rest."""
        gate_change = self.gate.change()
        self._metrics.in_flight_pairs.set(self.gate.pairs)
        self._metrics.lookahead_records.set(self._lookahead_size())
        self._metrics.in_flight_window.set(self.gate.high)
        self._metrics.paused.set(1 if self.gate.paused else 0)
        consumer = self._consumer
        if consumer is None:
            return
        if gate_change is not None:
            what = "paused" if self.gate.paused else "resumed"
            log.debug("fetching %s", what, extra={"in_flight_pairs": self.gate.pairs})
        assigned = set(self._partitions)
        mode_full = self._mode is not None and self._mode.full()
        if self.gate.paused or self.holds_back() or mode_full:
            wanted = assigned
        else:
            wanted = {tp for tp, work in self._partitions.items() if work.held}
        paused = consumer.paused() & assigned
        if wanted - paused:
            consumer.pause(*(wanted - paused))
        if paused - wanted:
            consumer.resume(*(paused - wanted))
            self.resumed.set()

    async def drain(self, timeout_s: float) -> None:
        """Let the records in flight finish, for at most ``timeout_s``; cancel the rest."""
        pending = set(self.tasks)
        if not pending:
            return
        log.info("draining in-flight requests", extra={"in_flight_requests": len(pending)})
        _, still_running = await asyncio.wait(pending, timeout=timeout_s)
        if still_running:
            log.warning(
                "drain timed out; unanswered requests will be redelivered",
                extra={"abandoned_requests": len(still_running)},
            )
            await cancel_all(still_running)


async def uncount_attempts(
    committer: CommitPolicy, work: Mapping[TopicPartition, PartitionWork]
) -> None:
    """Take back the attempts counted for records this worker is letting go unfinished
    on purpose (a revoke, a drain that ran out): it did not die on them. Counted, a slow
    valid request in flight through a few rebalances (autoscaling) would be taken for a
    poison record and dead-lettered."""
    for tp, partition_work in work.items():
        attempt = partition_work.unfinished_attempt
        if attempt is None:
            continue
        offset, attempts = attempt
        if await committer.commit_attempt(tp, partition_work, offset, attempts - 1):
            partition_work.counted = None


async def cancel_all(tasks: set[asyncio.Task[bool]]) -> None:
    """Cancel ``tasks`` and wait until they have ended."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
