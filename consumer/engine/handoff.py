"""The queue between the event loop and the engine's two threads.

One condition guards everything the three sides share: the batcher (the pairs waiting
for the model), the one batch cut ahead, whether the model is busy, how many requests
are still being tokenized, and whether the engine is stopping.

* the event loop adds and removes tickets (:meth:`BatchQueue.enqueue`, :meth:`remove`);
* the batch former cuts the next batch while the model runs the current one
  (:meth:`cut`, :meth:`offer`);
* the inference thread takes it (:meth:`take`) and says when it is idle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from consumer.engine.batcher import FormedBatch, TokenBudgetBatcher
from consumer.engine.work import Batch, Ticket

# With a batch on the device and more work coming (queued, being cut, or being tokenized),
# how often to look whether the device is done (the batch former's notify wakes the
# inference thread at once otherwise).
IN_FLIGHT_POLL_S = 0.0005

# With a batch on the device and nothing else anywhere in the engine, the inference thread
# stops polling and waits on the device itself (``take`` returns None): the device's own
# completion wakes it at once, where a poll lands up to IN_FLIGHT_POLL_S late. A request
# that arrives meanwhile is cut and prepared by the batch former all the same, and is
# launched as soon as the batch ends. Benchmarks turn it off to compare.
WAIT_ON_DEVICE_WHEN_QUIET = True


class BatchQueue:
    """Pairs waiting for the model, and the one batch cut ahead of it."""

    def __init__(self, batcher: TokenBudgetBatcher[Ticket], max_wait_s: float) -> None:
        self._cond = threading.Condition()
        self._batcher = batcher
        self._max_wait_s = max_wait_s
        self._next: Batch | None = None  # cut, waiting for the inference thread
        self._busy = False  # the inference thread has a batch
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
            pending = self._batcher.drain()
            if self._next is not None:
                pending.extend(self._next.tickets)
                self._next = None
            self._cond.notify_all()
        return pending

    # ---- batch former side ---------------------------------------------------------------

    def cut(self) -> FormedBatch[Ticket] | None:
        """Block until the slot ahead is free and pairs wait; cut a batch. None: stopping.

        The batch may hold only expired tickets (``items`` empty).
        """
        with self._cond:
            while not self._stopping and (self._next is not None or not self._batcher):
                self._cond.wait()
            if self._stopping:
                return None
            self._wait_while_idle()
            if self._stopping:
                return None
            return self._batcher.next_batch(time.time())

    def offer(self, batch: Batch) -> bool:
        """Put a cut batch in the slot ahead; False (not taken) when stopping."""
        with self._cond:
            if self._stopping:
                return False
            self._next = batch
            self._cond.notify_all()
            return True

    def _wait_while_idle(self) -> None:
        """With the model idle, less than a batch queued and more requests being
        tokenized, wait up to max_wait_ms for them (condition held).

        Under load (model busy) there is no wait: the next batch is cut at once and runs
        as soon as the model is free. A lone request (nothing else being tokenized) does
        not wait either: nothing is coming.
        """
        while (
            not self._stopping
            and not self._busy
            and self._tokenizing > 0
            and not self._batcher.would_fill_batch()
        ):
            oldest = self._batcher.oldest()
            if oldest is None:
                return
            left = oldest.enqueued + self._max_wait_s - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)

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
                elif device_done() or (WAIT_ON_DEVICE_WHEN_QUIET and self._quiet()):
                    break
                else:
                    self._cond.wait(IN_FLIGHT_POLL_S)
            if self._stopping or self._next is None:
                return None
            batch, self._next = self._next, None
            self._busy = True
            self._cond.notify_all()  # the former may cut the next batch now
            return batch

    def _quiet(self) -> bool:
        """Nothing queued, cut or being tokenized (condition held)."""
        return self._next is None and not self._batcher and self._tokenizing == 0

    def idle(self) -> None:
        """The inference thread has nothing on the model."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
