"""The queue between the event loop and the engine's two threads.

One condition guards everything the three sides share: the batcher (the pairs waiting
for the model), the one batch cut ahead, whether the model is busy and with which batches
(:class:`consumer.engine.pacing.DeviceSchedule`), how many requests are still being
tokenized, and whether the engine is stopping.

* the event loop adds and removes tickets (:meth:`BatchQueue.enqueue`, :meth:`remove`);
* the batch former cuts the next batch while the model runs the current one
  (:meth:`cut`, :meth:`offer`): with the model busy, as late as it allows (*late cut*,
  :mod:`consumer.engine.pacing`), so the batch takes what waits by then;
* the inference thread takes it (:meth:`take`), says when each batch is done
  (:meth:`settled`) and when it is idle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from consumer.engine.batcher import FormedBatch, TokenBudgetBatcher
from consumer.engine.pacing import BatchClock, DeviceSchedule, LeadTime
from consumer.engine.work import Batch, Ticket

# With a batch on the device and more work coming (queued, being cut, or being tokenized),
# how often to look whether the device is done (the batch former's notify wakes the
# inference thread at once otherwise).
IN_FLIGHT_POLL_S = 0.0005

# With a batch on the device and nothing else anywhere in the engine, the inference thread
# stops polling and waits on the device itself (``take`` returns None): the device's own
# completion wakes it at once, where a poll lands up to IN_FLIGHT_POLL_S late. With late
# cut it does so only for the batch's last stretch (its predicted end less half the late
# cut's margin and twice the clock's error), so that a request that comes earlier is
# launched behind the batch before it ends; one that comes later is cut and prepared all
# the same, and launched as soon as the batch ends. Benchmarks turn it off to compare.
WAIT_ON_DEVICE_WHEN_QUIET = True


class BatchQueue:
    """Pairs waiting for the model, and the one batch cut ahead of it.

    ``late_cut``: with the model busy, cut the next batch only when the model is due to
    need it, ``late_cut_margin_s`` ahead of that beyond the measured lead (False: as soon
    as the slot ahead is free).
    """

    def __init__(
        self,
        batcher: TokenBudgetBatcher[Ticket],
        max_wait_s: float,
        late_cut: bool = True,
        late_cut_margin_s: float = 0.001,
    ) -> None:
        if late_cut_margin_s < 0:
            raise ValueError("late_cut_margin_s must not be negative")
        self._cond = threading.Condition()
        self._batcher = batcher
        self._max_wait_s = max_wait_s
        self._late_cut = late_cut
        self._margin_s = late_cut_margin_s
        self._next: Batch | None = None  # cut, waiting for the inference thread
        self._forming = False  # cut, being prepared by the batch former
        self._busy = False  # the inference thread has a batch
        self._schedule = DeviceSchedule(BatchClock())  # the batches on the device
        self._lead = LeadTime()  # cut to launched
        self._wake = LeadTime()  # how late the batch former wakes for a late cut
        self._tokenizing = 0  # requests accepted and not yet queued
        self._stopping = False

    # ---- the token budget ------------------------------------------------------------

    @property
    def max_batch_tokens(self) -> int:
        """The batcher's current token budget."""
        return self._batcher.max_batch_tokens

    @max_batch_tokens.setter
    def max_batch_tokens(self, value: int) -> None:
        with self._cond:
            self._batcher.max_batch_tokens = value

    @property
    def quick_batch_cost(self) -> int:
        """The scorer's quick batch size the batcher cuts to under a small backlog (0: none)."""
        return self._batcher.quick_batch_cost

    @quick_batch_cost.setter
    def quick_batch_cost(self, value: int) -> None:
        with self._cond:
            self._batcher.quick_batch_cost = max(0, value)

    @property
    def max_batch_pairs(self) -> int:
        """The batcher's pair limit."""
        return self._batcher.max_batch_pairs

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping

    # ---- event loop side ---------------------------------------------------------------

    def tokenizing(self, delta: int) -> None:
        """Count requests being tokenized (the batch former waits for them when idle)."""
        with self._cond:
            self._tokenizing += delta
            self._cond.notify_all()

    def enqueue(self, tickets: Iterable[Ticket]) -> bool:
        """Queue a tokenized request's tickets and stop counting it as tokenizing.

        Both in one step, so the batch former sees both. False (nothing queued) when
        the engine is stopping.
        """
        with self._cond:
            self._tokenizing -= 1
            if not self._stopping:
                self._batcher.add_many(tickets)
            self._cond.notify_all()
            return not self._stopping

    def remove(self, tickets: Iterable[Ticket]) -> None:
        """Take a given-up request's tickets out of the queue (those still in it)."""
        with self._cond:
            for ticket in tickets:
                self._batcher.remove(ticket)

    def stop(self) -> list[Ticket]:
        """Stop both threads; returns the tickets neither queue nor thread will answer."""
        with self._cond:
            self._stopping = True
            self._forming = False
            pending = self._batcher.drain()
            if self._next is not None:
                pending.extend(self._next.tickets)
                self._next = None
            self._cond.notify_all()
        return pending

    # ---- batch former side ---------------------------------------------------------------

    def cut(self) -> FormedBatch[Ticket] | None:
        """Block until the slot ahead is free, pairs wait and it is time to cut (see
        :meth:`_wait_left`); cut a batch. None: stopping.

        The batch may hold only expired tickets (``items`` empty).
        """
        with self._cond:
            deadline: float | None = None  # the late cut's, when the last wait was for it
            while True:
                if self._stopping:
                    return None
                if self._next is not None or not self._batcher:
                    self._cond.wait()
                    deadline = None
                    continue
                now = time.perf_counter()
                wait = self._wait_left(now)
                if wait is None or wait[0] <= 0:
                    if deadline is not None:  # woke for it: how late, GIL and all
                        self._wake.add(now - deadline)
                    break
                seconds, late_cut = wait
                timed_out = not self._cond.wait(seconds)
                deadline = now + seconds if late_cut and timed_out else None
            formed = self._batcher.next_batch(time.time())
            self._forming = bool(formed.items)
            return formed

    def offer(self, batch: Batch) -> bool:
        """Put a cut batch in the slot ahead; False (not taken) when stopping."""
        with self._cond:
            self._forming = False
            if self._stopping:
                return False
            self._next = batch
            self._cond.notify_all()
            return True

    def _wait_left(self, now: float) -> tuple[float, bool] | None:
        """How long the batch former should still wait before cutting, and whether that is
        the late cut's wait (condition held); None or not positive: cut now.

        * A full batch waits: cut it.
        * Model idle: wait up to max_wait_ms for requests still being tokenized; a lone
          request (nothing else being tokenized) does not wait, nothing is coming.
        * Model busy (late cut): wait until it is due to be free, less the lead a batch
          needs to reach it and the margin, so the batch takes what waits by then. Not
          past the quick backlog: its batches are too big for the lead measured on
          quick ones, and a backlog that large fills them anyway.
        """
        if self._batcher.would_fill_batch():
            return None
        if not self._busy:
            oldest = self._batcher.oldest()
            if self._tokenizing <= 0 or oldest is None:
                return None
            return oldest.enqueued + self._max_wait_s - now, False
        if not self._late_cut or self._batcher.past_quick_backlog():
            return None
        free_at = self._schedule.free_at()
        if free_at is None:
            return None
        ahead = self._lead.seconds() + self._wake.seconds() + self._margin_s
        return free_at - ahead - 2.0 * self._schedule.clock.error() - now, True

    # ---- inference thread side -------------------------------------------------------------

    def take(self, device_done: Callable[[], bool] | None) -> Batch | None:
        """The next cut batch, marking the model busy.

        ``device_done`` is None when nothing is in flight: then wait for a batch.
        Otherwise wait only while the batch in flight still runs and more work is on its
        way, so its results are collected as soon as it ends. None when stopping, when the
        batch in flight ended, or when nothing else is queued, cut or being tokenized (the
        caller then waits on the device itself).
        """
        with self._cond:
            while self._next is None and not self._stopping:
                if device_done is None:
                    self._cond.wait()
                elif device_done() or (
                    WAIT_ON_DEVICE_WHEN_QUIET and self._quiet() and self._device_nearly_done()
                ):
                    break
                else:
                    self._cond.wait(IN_FLIGHT_POLL_S)
            if self._stopping or self._next is None:
                return None
            batch, self._next = self._next, None
            self._busy = True
            self._schedule.launched(batch, batch.cost, time.perf_counter())
            self._cond.notify_all()  # the former may cut the next batch now
            return batch

    def _quiet(self) -> bool:
        """Nothing queued, cut, being prepared or being tokenized (condition held)."""
        return (
            self._next is None and not self._forming and not self._batcher and self._tokenizing == 0
        )

    def _device_nearly_done(self) -> bool:
        """Whether the device is in the last stretch of its work, where only waiting on
        the device itself reads its results as soon as they exist (condition held)."""
        if not self._late_cut:
            return True
        free_at = self._schedule.free_at()
        if free_at is None:
            return True
        stretch = 0.5 * self._margin_s + 2.0 * self._schedule.clock.error()
        return free_at - time.perf_counter() <= stretch

    def settled(self, batch: Batch, scored: bool, launch_s: float | None) -> None:
        """A batch from :meth:`take` is done with: its results were read (``scored``) or it
        failed. ``launch_s``: how long launching it took (None: it was not launched whole)."""
        with self._cond:
            self._schedule.settled(batch, time.perf_counter(), measured=scored)
            if scored and launch_s is not None:
                self._lead.add(batch.prepare_s + launch_s)
            self._cond.notify_all()

    def idle(self) -> None:
        """The inference thread has nothing on the model."""
        with self._cond:
            self._busy = False
            self._schedule.clear()
            self._cond.notify_all()
