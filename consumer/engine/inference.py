"""The inference thread: warm the model up, then run batches two deep.

With a pipelined scorer, batch k+1 is launched on the device before batch k's results
are collected, so the device never idles while the host finishes one batch and starts
the next. A scorer that is not pipelined computes in ``launch``; its batch is collected
at once.

Failures: a batch that runs out of device memory is split in halves and retried, and
the token budget is lowered (:mod:`consumer.engine.budget`). Any other failure, a batch
whose logits are not all finite among them (a GPU or checkpoint that returns garbage
without raising), first runs the *check batch* (one known pair, scored at warm-up): if
the model fails that too, or scores it differently, the model is broken and the engine
fails (``on_failed``); every request is left for another worker. Otherwise the failure
is the batch's own: it is split in halves by request and each half retried, so one
poisoned request fails alone and its neighbours are scored. Every ticket taken from the
queue is answered exactly once. The warm-up itself fails when the check pair's logit is
not finite: such a model never becomes ready.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from consumer.engine.api import BatchTiming, DeadlineExceeded, EngineError, EngineFailed
from consumer.engine.budget import TokenBudget
from consumer.engine.handoff import BatchQueue
from consumer.engine.metrics import BatchReport, EngineMetrics, EngineStats
from consumer.engine.settings import EngineSettings
from consumer.engine.work import Batch, Outcome, Post, Ticket, failure
from consumer.runtime.prompt import EncodedPair, PromptEncoder
from consumer.runtime.scorer import Scorer

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch.cuda.OutOfMemoryError and any error class named like it."""
    return any("OutOfMemory" in cls.__name__ for cls in type(exc).__mro__)


# The check batch's logit must come back within this of the warm-up's (same pair,
# same shapes: only a broken model moves it).
CHECK_TOLERANCE = 0.05


class NonFiniteLogits(RuntimeError):
    """The model gave NaN or infinite logits: a batch failure like an exception."""


@dataclass(eq=False)
class _Launched:
    """A batch whose device work is queued (``handle``) and not collected yet.

    ``model_checked``: the check batch already passed since this batch's first failure
    (its halves need not check again). ``batch``: the batch taken from the queue that this
    launch runs whole (None for a retried half), told to the queue once it is done with;
    ``launch_s``: how long launching it took.
    """

    tickets: list[Ticket]
    handle: object
    started: float
    model_checked: bool = False
    batch: Batch | None = None
    launch_s: float | None = None


@dataclass(frozen=True)
class _CheckBatch:
    """A known pair and the logit the model gave it at warm-up."""

    pairs: list[EncodedPair]
    logits: list[float]


class InferenceLoop:
    """Runs :meth:`run` on the one thread that touches the model."""

    def __init__(
        self,
        queue: BatchQueue,
        scorer: Scorer,
        encoder: PromptEncoder,
        settings: EngineSettings,
        metrics: EngineMetrics,
        stats: EngineStats,
        post: Post,
        on_failed: Callable[[str], None],
    ) -> None:
        self._queue = queue
        self._scorer = scorer
        self._encoder = encoder
        self._settings = settings
        self._metrics = metrics
        self._stats = stats
        self._post = post
        self._on_failed = on_failed
        self._budget = TokenBudget(queue, settings, metrics)
        self._pipelined = scorer.traits.pipelined
        self._batch_ids = itertools.count(1)
        self._last_batch_end = 0.0  # when results were last collected
        self._check: _CheckBatch | None = None
        # Read by the engine's stall watchdog: whether a batch is outstanding, and when
        # the model last finished one (or took work after being idle).
        self.busy = False
        self.progress_at = time.monotonic()
        self.warmed: concurrent.futures.Future[None] = concurrent.futures.Future()

    def stalled_for(self) -> float:
        """Seconds the model has had work without finishing a batch (0 when idle)."""
        return time.monotonic() - self.progress_at if self.busy else 0.0

    def run(self) -> None:
        """Warm up (settling :attr:`warmed`), then run batches until the queue stops."""
        if not self._warm_up():
            return
        in_flight: _Launched | None = None
        while True:
            batch = self._queue.take(self._done_checker(in_flight))
            if batch is None and in_flight is None:
                return  # stopping
            if not self.busy:
                self.busy, self.progress_at = True, time.monotonic()
            try:
                launched = self._launch(batch) if batch is not None else None
                if in_flight is not None:
                    self._finish(in_flight)
                if launched is not None and not self._pipelined:
                    self._finish(launched)  # its work is already done: answer it now
                    launched = None
            except BaseException as exc:
                self._crash(exc, batch, in_flight)
                raise
            in_flight = launched
            if in_flight is None:
                self.busy = False
                self._queue.idle()

    # ---- warm-up ----------------------------------------------------------------------

    def _warm_up(self) -> bool:
        try:
            if self._settings.warmup:
                started = time.perf_counter()
                self._scorer.warmup(self._encoder)
                self._stats.warmup_s = time.perf_counter() - started
            pairs = self._encoder.encode("check query", ["check document"], None)
            logits = list(self._scorer.score(pairs))
            if not all(math.isfinite(logit) for logit in logits):
                raise NonFiniteLogits(
                    f"the model gave its check pair the logit {logits} at warm-up: "
                    "the checkpoint or the device is broken"
                )
            self._check = _CheckBatch(pairs, logits)
            # known once the warm-up has captured what it can replay
            self._queue.quick_batch_cost = self._scorer.traits.quick_batch_cost
        except BaseException as exc:
            if not self.warmed.cancelled():
                self.warmed.set_exception(exc)
            return False
        if not self.warmed.cancelled():
            self.warmed.set_result(None)
        return True

    # ---- one batch ----------------------------------------------------------------------

    def _done_checker(self, in_flight: _Launched | None) -> Callable[[], bool] | None:
        """For the queue: whether the batch in flight has finished (None: nothing is)."""
        if in_flight is None:
            return None
        scorer = self._scorer

        def done() -> bool:
            try:
                return bool(scorer.done(in_flight.handle))
            except Exception:  # the device's error surfaces in collect(), where it is handled
                return True

        return done

    def _launch(self, batch: Batch) -> _Launched | None:
        """Queue the batch's live tickets on the device; None if nothing was left to run."""
        started = time.perf_counter()
        live = self._live_tickets(batch.tickets)
        launched, whole = None, False
        if live:
            # a ticket dropped since the batch was prepared: build the inputs again
            whole = len(live) == len(batch.tickets)
            launched = self._launch_tickets(live, batch.prepared if whole else None)
        if launched is None:
            self._queue.settled(batch, scored=False, launch_s=None)
            return None
        launched.batch = batch
        launched.launch_s = time.perf_counter() - started if whole else None
        return launched

    def _launch_tickets(
        self, tickets: list[Ticket], prepared: object | None, model_checked: bool = False
    ) -> _Launched | None:
        started = time.perf_counter()
        failure: Exception | None = None
        try:
            if prepared is None:
                prepared = self._scorer.prepare([t.pair for t in tickets])
            return _Launched(tickets, self._scorer.launch(prepared), started, model_checked)
        except Exception as exc:
            failure = None if is_out_of_memory(exc) else exc
        # outside the except block: the failed attempt's tensors are freed first
        if failure is not None:
            self._after_failure(tickets, failure, model_checked)
        else:
            self._after_out_of_memory(tickets)
        return None

    def _finish(self, launched: _Launched) -> None:
        """Wait for a launched batch and post its results; tell the queue it is done."""
        scored = False
        try:
            scored = self._collect(launched)
        finally:
            if launched.batch is not None:
                self._queue.settled(launched.batch, scored, launched.launch_s)

    def _collect(self, launched: _Launched) -> bool:
        """Wait for a launched batch and post its results; True when it scored."""
        tickets = launched.tickets
        failure: Exception | None = None
        try:
            logits = list(self._scorer.collect(launched.handle))
            scores = self._checked_scores(tickets, logits)
        except Exception as exc:
            failure = None if is_out_of_memory(exc) else exc
        else:
            # The device ran the previous batch first: count this one's time from the
            # later of its launch and the previous batch's end.
            self._deliver(tickets, logits, scores, max(launched.started, self._last_batch_end))
            return True
        if failure is not None:
            self._after_failure(tickets, failure, launched.model_checked)
        else:
            self._after_out_of_memory(tickets)
        return False

    def _score_now(self, tickets: list[Ticket], model_checked: bool = False) -> None:
        """Launch and collect at once (the halves of a split batch)."""
        launched = self._launch_tickets(tickets, None, model_checked)
        if launched is not None:
            self._finish(launched)

    def _after_failure(self, tickets: list[Ticket], exc: Exception, model_checked: bool) -> None:
        """A batch failed (not out of memory): the model's fault, or the batch's?"""
        if not model_checked:
            broken = self._model_broken()
            if broken is not None:
                reason = f"{broken} after a batch failed with {type(exc).__name__}: {exc}"
                self._on_failed(reason)  # first: the engine is failed before they hear
                self._post(failure(tickets, EngineFailed, reason))
                return
        requests = list({t.request: None for t in tickets})
        if len(requests) == 1:
            self._post_failure(tickets, exc)  # this request alone fails on a working model
            return
        log.warning(
            "a batch of %d requests failed on a working model: retrying it in halves",
            len(requests),
            extra={"error": repr(exc)},
        )
        first = set(requests[: len(requests) // 2])
        self._score_now([t for t in tickets if t.request in first], model_checked=True)
        self._score_now([t for t in tickets if t.request not in first], model_checked=True)

    def _model_broken(self) -> str | None:
        """Score the check batch; why the model is broken, or None when it scores it right."""
        check = self._check
        if check is None:
            return None
        try:
            logits = list(self._scorer.score(check.pairs))
        except Exception as exc:
            return f"the model failed its check batch ({type(exc).__name__}: {exc})"
        same = all(
            math.isfinite(new) and abs(new - old) <= CHECK_TOLERANCE * max(1.0, abs(old))
            for new, old in zip(logits, check.logits, strict=True)
        )
        if not same:
            return f"the model scored its check batch {logits}, not {check.logits}"
        return None

    def _after_out_of_memory(self, tickets: list[Ticket]) -> None:
        self._scorer.release_cached_memory()
        lowered = self._budget.lower()
        if len(tickets) == 1:
            log.warning(
                "out of memory on a single pair of %d tokens (answered with an error); "
                "max_batch_tokens now %d",
                tickets[0].tokens,
                lowered,
            )
            message = f"out of memory scoring one pair of {tickets[0].tokens} tokens"
            self._post(failure(tickets, EngineError, message))
            return
        self._stats.oom_splits += 1
        self._metrics.out_of_memory_split()
        log.warning(
            "out of memory on a batch of %d pairs: split in halves; max_batch_tokens now %d",
            len(tickets),
            lowered,
        )
        half = len(tickets) // 2
        self._score_now(tickets[:half])
        self._score_now(tickets[half:])

    def _live_tickets(self, tickets: list[Ticket]) -> list[Ticket]:
        """Tickets still wanted; those whose deadline passed are answered here."""
        now = time.time()
        live = [t for t in tickets if not t.request.done]
        expired = [t for t in live if t.deadline is not None and t.deadline <= now]
        if not expired:
            return live
        self._post(failure(expired, DeadlineExceeded, "the request's deadline passed in the queue"))
        return [t for t in live if t.deadline is None or t.deadline > now]

    def _checked_scores(self, tickets: list[Ticket], logits: list[float]) -> list[float]:
        if len(logits) != len(tickets):
            raise RuntimeError(f"scorer gave {len(logits)} logits for {len(tickets)} pairs")
        bad = sum(not math.isfinite(logit) for logit in logits)
        if bad:
            raise NonFiniteLogits(f"{bad} of {len(logits)} logits are not finite")
        return list(self._scorer.calibrate(logits))

    def _post_failure(self, tickets: list[Ticket], exc: Exception) -> None:
        log.error("scoring a batch of %d pairs failed", len(tickets), exc_info=exc)
        message = f"scoring failed: {type(exc).__name__}: {exc}"
        self._post(failure(tickets, EngineError, message))

    def _deliver(
        self, tickets: list[Ticket], logits: list[float], scores: list[float], started: float
    ) -> None:
        ended = time.perf_counter()
        end_ns = time.time_ns()
        self._last_batch_end = ended
        self.progress_at = time.monotonic()
        self._budget.batch_succeeded()
        seconds = ended - started
        report = self._record(tickets, seconds, started)
        batch = BatchTiming(
            batch_id=next(self._batch_ids),
            start_ns=end_ns - round(seconds * 1e9),
            end_ns=end_ns,
            seconds=seconds,
            pairs=len(tickets),
            tokens=report.real_tokens,
            cost_tokens=report.cost_tokens,
        )
        self._post(Outcome(tickets, logits, scores, batch=batch))

    def _record(self, tickets: list[Ticket], seconds: float, started: float) -> BatchReport:
        pairs = [t.pair for t in tickets]
        report = BatchReport(
            pairs=pairs,
            real_tokens=sum(t.tokens for t in tickets),
            cost_tokens=int(self._scorer.batch_cost(pairs)),
            seconds=seconds,
            queue_waits_s=[max(0.0, started - t.enqueued) for t in tickets],
        )
        self._stats.add(report)
        try:
            self._metrics.batch_scored(report)
        except Exception:
            log.warning("recording a batch's metrics failed", exc_info=True)
        return report

    def _crash(self, exc: BaseException, batch: Batch | None, in_flight: _Launched | None) -> None:
        """A bug in this loop: answer what it held, then let the engine fail the rest."""
        log.exception("inference thread failed")
        lost = (batch.tickets if batch else []) + (in_flight.tickets if in_flight else [])
        self._post(failure(lost, EngineError, f"inference failed: {type(exc).__name__}"))
        self._on_failed("the inference thread failed")
