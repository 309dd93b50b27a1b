"""The scoring engine: tokenizer threads, one token-budget queue, one inference thread.

Data flow of one request (``Engine.score``)::

    event loop --encode in a tokenizer thread--> pairs --> one shared TokenBudgetBatcher
                                                                |
      batch former thread: cuts batch k+1 (and builds its tensors) while ...
                                                                |
      ... the inference thread runs batch k --> call_soon_threadsafe(results) --> event loop

* The event loop never runs torch or the tokenizer.
* Batch ``k + 1`` is cut (and, if the scorer offers ``prepare``, its input tensors are
  built) while the model runs batch ``k``; a short ``max_wait_ms`` (for requests still
  being tokenized) applies only while the model is idle, so under load batches go
  back to back.
* Every queued pair is resolved exactly once, with a score or an error, whatever
  happens to its batch: a failing batch fails each of its requests; an out-of-memory
  batch is split in halves and retried (and the token budget lowered); ``close()``
  fails everything pending with :class:`EngineClosed`.
* Expired pairs are dropped before they reach the model.

Payloads are opaque here and the batch cost comes from ``scorer.padded_cost``, so
packed (padding-free) batches or prefix reuse change only the scorer.

Optional scorer hooks (used when both exist): ``prepare(pairs) -> object`` builds a
batch's inputs on the batch former thread (host work only, e.g. pinned tensors), and
``score_prepared(prepared) -> list[float]`` runs it on the inference thread. A scorer
that also has ``launch(prepared) -> handle`` (queue the device work, return at once) and
``collect(handle) -> list[float]`` (wait for it) is driven two batches deep: batch
``k + 1`` is queued on the device before the results of batch ``k`` are read, so the
device never idles while the host finishes one batch and starts the next. Its optional
``done(handle) -> bool`` lets the inference thread wait for batch ``k + 1`` to be cut
while batch ``k`` still runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from consumer.batcher import TokenBudgetBatcher
from consumer.engine_api import (
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    InvalidRequest,
    ScoreRequest,
    ScoreResult,
)
from consumer.prompt import EncodedPair, PromptEncoder, PromptTooLong

if TYPE_CHECKING:  # torch and prometheus_client stay out of this module's imports
    from consumer.metrics import Metrics
    from consumer.model_loader import LoadedModel
    from consumer.model_options import ModelOptions
    from consumer.scorer import Scorer

log = logging.getLogger(__name__)

# With a batch on the device and the next not cut yet, how often to look whether the
# device is done (the batch former's notify wakes the thread at once otherwise).
IN_FLIGHT_POLL_S = 0.0005

# Called on the inference thread after each successful model call with the pairs and
# the seconds it took (benchmarks and tracing).
BatchObserver = Callable[[Sequence[EncodedPair], float], None]


@dataclass(frozen=True)
class EngineSettings:
    """Batching and threading knobs of the engine.

    ``max_batch_tokens`` is in the scorer's cost units (padded tokens, or real tokens
    for packed batches); after an out-of-memory it is lowered by ``oom_budget_factor``,
    never below ``min_batch_tokens``, and raised again by the same factor (never above
    ``max_batch_tokens``) after ``oom_recovery_batches`` successful batches in a row, so
    a passing memory shortage does not cost throughput for the rest of the process.
    """

    max_batch_tokens: int = 65536
    max_batch_pairs: int = 512
    max_wait_ms: float = 2.0
    tokenizer_threads: int = 4
    warmup: bool = True
    window_pairs: int = 4096
    min_batch_tokens: int = 4096
    oom_budget_factor: float = 0.75
    oom_recovery_batches: int = 200
    close_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_pairs < 1:
            raise ValueError("max_batch_tokens and max_batch_pairs must be at least 1")
        if self.tokenizer_threads < 1:
            raise ValueError("tokenizer_threads must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if not 0 < self.oom_budget_factor < 1:
            raise ValueError("oom_budget_factor must be between 0 and 1")
        if self.oom_recovery_batches < 1:
            raise ValueError("oom_recovery_batches must be at least 1")


class _Request:
    """Loop-side state of one request; mutated only on the event loop thread."""

    __slots__ = (
        "batch_seconds",
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

    def __init__(self, future: asyncio.Future[None], size: int, deadline: float | None) -> None:
        self.future = future
        self.deadline = deadline
        self.logits = [0.0] * size
        self.scores = [0.0] * size
        self.remaining = size
        # Read without a lock by the worker threads: at worst they score a pair whose
        # request was just given up, and its result is ignored.
        self.done = False
        self.enqueued = time.perf_counter()
        self.finished = self.enqueued
        self.batch_seconds: dict[int, float] = {}
        self.tickets: list[_Ticket] = []


@dataclass(eq=False, slots=True)
class _Ticket:
    """One queued pair (a :class:`consumer.batcher.BatchItem`)."""

    pair: EncodedPair
    request: _Request
    index: int
    tokens: int
    deadline: float | None
    enqueued: float


@dataclass(eq=False)
class _Batch:
    tickets: list[_Ticket]
    cost: int
    prepared: object | None = None


@dataclass(eq=False)
class _Launched:
    """A batch whose device work is queued (``handle``) and not collected yet."""

    tickets: list[_Ticket]
    handle: object
    started: float


@dataclass(eq=False)
class _Outcome:
    """Results of one model call (or one error) for the loop to hand out."""

    tickets: list[_Ticket]
    logits: Sequence[float] = ()
    scores: Sequence[float] = ()
    error_type: type[EngineError] | None = None
    error_message: str = ""
    batch_id: int = 0
    seconds: float = 0.0


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch.cuda.OutOfMemoryError and any error class named like it."""
    return any("OutOfMemory" in cls.__name__ for cls in type(exc).__mro__)


@dataclass
class EngineStats:
    """Counters the engine keeps even without a Metrics object (written by its threads)."""

    batches: int = 0
    pairs_scored: int = 0
    real_tokens: int = 0
    cost_tokens: int = 0  # what the batches cost (padded tokens, or real ones when packed)
    oom_splits: int = 0
    warmup_s: float = 0.0


class Engine:
    """The :class:`consumer.engine_api.RerankEngine` over an encoder and a scorer.

    Build it from a :class:`LoadedModel`, from ``encoder`` + ``scorer`` + ``name``, or
    with :meth:`from_options` to load the model in :meth:`start`.
    """

    def __init__(
        self,
        model: LoadedModel | None = None,
        settings: EngineSettings | None = None,
        metrics: Metrics | None = None,
        *,
        encoder: PromptEncoder | None = None,
        scorer: Scorer | None = None,
        name: str | None = None,
        loader: Callable[[], LoadedModel] | None = None,
        batch_observer: BatchObserver | None = None,
    ) -> None:
        given = sum(x is not None for x in (model, scorer, loader))
        if given != 1 or (scorer is not None and (encoder is None or name is None)):
            raise ValueError("give exactly one of: model, encoder+scorer+name, loader")
        self.settings = settings or EngineSettings()
        self._metrics = metrics
        self._loader = loader
        self._batch_observer = batch_observer
        self._name = name or ""
        self._encoder: PromptEncoder | None = encoder
        self._scorer: Scorer | None = scorer
        if model is not None:
            self._adopt(model)

        self._cond = threading.Condition()
        self._batcher: TokenBudgetBatcher[_Ticket] = TokenBudgetBatcher(
            max_batch_tokens=self.settings.max_batch_tokens,
            max_batch_pairs=self.settings.max_batch_pairs,
            cost=self._batch_cost,
            window_pairs=self.settings.window_pairs,
        )
        self._next_batch: _Batch | None = None  # cut, waiting for the inference thread
        self._busy = False  # the inference thread is running a batch
        self._tokenizing = 0  # requests accepted and not yet queued (guarded by _cond)
        self._last_batch_end = 0.0  # when the inference thread last collected results
        self._batches_since_lowered = 0  # good batches since the budget was last lowered
        self._pipelined = False  # the scorer has launch/collect (decided in start())
        self._stopping = False
        self._batch_ids = itertools.count(1)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokenizer_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._threads: list[threading.Thread] = []
        self._warmed: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._active: set[_Request] = set()
        self._in_flight = 0
        self._started = False
        self._ready = False
        self._closed = False
        self.stats = EngineStats()

    @classmethod
    def from_options(
        cls,
        options: ModelOptions,
        settings: EngineSettings | None = None,
        metrics: Metrics | None = None,
    ) -> Engine:
        """An engine that loads ``options.model`` (in a worker thread) when started."""

        def load() -> LoadedModel:
            from consumer.model_loader import load_model  # imports torch

            return load_model(options)

        return cls(settings=settings, metrics=metrics, loader=load, name=options.model)

    def _adopt(self, model: LoadedModel) -> None:
        self._name = model.name
        self._encoder = model.encoder
        self._scorer = model.scorer

    # ---- RerankEngine -------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The model id reported in replies."""
        return self._name

    @property
    def ready(self) -> bool:
        """True once the model is loaded and warmed up, until close()."""
        return self._ready

    @property
    def in_flight_pairs(self) -> int:
        """Pairs accepted (tokenized and queued) and not yet resolved."""
        return self._in_flight

    @property
    def max_batch_tokens(self) -> int:
        """The current token budget (lower than the setting after an out-of-memory)."""
        return self._batcher.max_batch_tokens

    async def start(self) -> None:
        """Load the model (if needed), warm it up on the inference thread, start batching."""
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._loader is not None:
            self._adopt(await loop.run_in_executor(None, self._loader))
        # packed batches cost no padding: keep each request's pairs together instead
        self._batcher.by_length = not getattr(self._scorer, "packed", False)
        self._pipelined = hasattr(self._scorer, "launch") and hasattr(self._scorer, "collect")
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.tokenizer_threads, thread_name_prefix="rerank-tokenize"
        )
        self._threads = [
            threading.Thread(target=self._inference_main, name="rerank-inference", daemon=True),
            threading.Thread(target=self._former_main, name="rerank-batcher", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        try:
            await asyncio.wrap_future(self._warmed)
        except asyncio.CancelledError:
            if self._closed:  # close() was called during the warm-up
                raise EngineClosed("the engine was closed during its warm-up") from None
            raise
        except Exception as exc:
            await self.close()
            raise EngineError(f"model warm-up failed: {type(exc).__name__}: {exc}") from exc
        self._ready = True
        self._publish_model_info()
        log.info(
            "engine ready: model=%s max_batch_tokens=%d max_batch_pairs=%d",
            self._name,
            self._batcher.max_batch_tokens,
            self._batcher.max_batch_pairs,
        )

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Score every document of ``request``, in order; raises :class:`EngineError`."""
        self._check_open()
        if _expired(request.deadline):
            raise DeadlineExceeded("the request's deadline passed before it was scored")
        if not request.documents:
            return ScoreResult((), (), 0, (), 0.0, 0.0)
        started = time.perf_counter()
        self._count_tokenizing(+1)
        try:
            pairs = await self._encode(request)
            tokenize_s = time.perf_counter() - started
            self._check_open()
            if _expired(request.deadline):
                raise DeadlineExceeded("the request's deadline passed while it was tokenized")
        except BaseException:
            self._count_tokenizing(-1)
            raise
        req = self._enqueue(pairs, request.deadline)
        try:
            if request.deadline is None:
                await req.future
            else:
                async with asyncio.timeout(max(0.0, request.deadline - time.time())):
                    await req.future
        except TimeoutError:
            self._abandon(req)
            raise DeadlineExceeded(
                "the request's deadline passed before all pairs were scored"
            ) from None
        except asyncio.CancelledError:
            self._abandon(req)
            raise
        return self._result(req, pairs, tokenize_s)

    async def close(self) -> None:
        """Fail pending work with :class:`EngineClosed` and stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._ready = False
        with self._cond:
            self._stopping = True
            self._batcher.drain()
            self._next_batch = None
            self._cond.notify_all()
        for req in list(self._active):
            self._fail(req, EngineClosed, "the engine is shutting down")
        self._warmed.cancel()  # a start() still warming up stops waiting
        if self._tokenizer_pool is not None:
            self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        if self._threads:
            # The inference thread may be inside a long batch: join off the loop.
            await asyncio.get_running_loop().run_in_executor(None, self._join_threads)
        log.info("engine closed")

    # ---- loop side ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("the engine is shutting down")
        if not self._ready:
            raise EngineError("the engine is not started")

    async def _encode(self, request: ScoreRequest) -> list[EncodedPair]:
        assert self._encoder is not None and self._tokenizer_pool is not None
        loop = asyncio.get_running_loop()
        try:
            pairs = await loop.run_in_executor(
                self._tokenizer_pool,
                self._encoder.encode,
                request.query,
                request.documents,
                request.instruction,
            )
        except PromptTooLong as exc:
            raise InvalidRequest(str(exc)) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and (task is None or not task.cancelling()):
                # close() cancelled the tokenizer pool's queue, not this caller
                raise EngineClosed("the engine is shutting down") from None
            raise
        except RuntimeError as exc:  # the pool was shut down by close()
            if self._closed:
                raise EngineClosed("the engine is shutting down") from exc
            raise EngineError(f"tokenization failed: {exc}") from exc
        except Exception as exc:
            raise EngineError(f"tokenization failed: {type(exc).__name__}: {exc}") from exc
        if len(pairs) != len(request.documents):
            raise EngineError(
                f"encoder gave {len(pairs)} pairs for {len(request.documents)} documents"
            )
        return pairs

    def _count_tokenizing(self, delta: int) -> None:
        with self._cond:
            self._tokenizing += delta
            self._cond.notify_all()

    def _enqueue(self, pairs: list[EncodedPair], deadline: float | None) -> _Request:
        """Queue a tokenized request's pairs (and count it as no longer tokenizing)."""
        assert self._loop is not None
        req = _Request(self._loop.create_future(), len(pairs), deadline)
        req.tickets = [
            _Ticket(pair, req, i, pair.tokens, deadline, req.enqueued)
            for i, pair in enumerate(pairs)
        ]
        with self._cond:
            self._tokenizing -= 1  # in the same step, so the batch former sees both
            stopped = self._stopping
            if not stopped:
                self._batcher.add_many(req.tickets)
            self._cond.notify_all()
        if stopped:  # a worker thread died meanwhile: nothing would ever score these
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            raise EngineError("the engine stopped")
        self._active.add(req)
        self._add_in_flight(len(pairs))
        return req

    def _result(self, req: _Request, pairs: list[EncodedPair], tokenize_s: float) -> ScoreResult:
        inference_s = sum(req.batch_seconds.values())
        in_engine_s = req.finished - req.enqueued
        return ScoreResult(
            logits=tuple(req.logits),
            scores=tuple(req.scores),
            prompt_tokens=sum(p.tokens for p in pairs),
            truncated=tuple(p.truncated for p in pairs),
            queue_ms=max(0.0, in_engine_s - inference_s) * 1000.0,
            inference_ms=inference_s * 1000.0,
            extra={"tokenize_ms": tokenize_s * 1000.0, "batches": float(len(req.batch_seconds))},
        )

    def _deliver(self, outcome: _Outcome) -> None:
        """Hand one batch's results (or error) to their requests. Runs on the loop."""
        if outcome.error_type is not None:
            for req in {t.request: None for t in outcome.tickets}:
                self._fail(req, outcome.error_type, outcome.error_message)
            return
        now = time.perf_counter()
        for ticket, logit, score in zip(
            outcome.tickets, outcome.logits, outcome.scores, strict=True
        ):
            req = ticket.request
            if req.done:
                continue
            req.logits[ticket.index] = logit
            req.scores[ticket.index] = score
            req.batch_seconds[outcome.batch_id] = outcome.seconds
            req.remaining -= 1
            self._add_in_flight(-1)
            if req.remaining == 0:
                req.done = True
                req.finished = now
                self._active.discard(req)
                if not req.future.done():
                    req.future.set_result(None)

    def _fail(self, req: _Request, error_type: type[EngineError], message: str) -> None:
        if req.done:
            return
        self._abandon(req)
        if not req.future.done():
            req.future.set_exception(error_type(message))

    def _abandon(self, req: _Request) -> None:
        """Give up a request: drop its queued pairs and stop counting them."""
        if req.done:
            return
        req.done = True
        self._active.discard(req)
        with self._cond:
            for ticket in req.tickets:
                self._batcher.remove(ticket)
        self._add_in_flight(-req.remaining)
        req.remaining = 0

    def _add_in_flight(self, delta: int) -> None:
        # The rerank_in_flight_pairs gauge belongs to the worker, which counts from
        # record fetch to reply acknowledged (the number backpressure acts on).
        self._in_flight += delta

    def _publish_model_info(self) -> None:
        if self._metrics is None or self._scorer is None:
            return
        self._metrics.max_batch_tokens.set(self._batcher.max_batch_tokens)
        self._metrics.model_info.info(
            {
                "model": self._name,
                "kind": str(getattr(self._scorer, "kind", "")),
                "device": str(getattr(self._scorer, "device", "")),
                "dtype": str(getattr(self._scorer, "dtype", "")),
            }
        )

    def _join_threads(self) -> None:
        deadline = time.monotonic() + self.settings.close_timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("thread %s did not stop within the close timeout", thread.name)

    # ---- batch former thread ------------------------------------------------------

    def _former_main(self) -> None:
        """Cut the next batch while the model runs the current one."""
        try:
            while True:
                batch = self._cut_next_batch()
                if batch is None:
                    return
                batch.prepared = self._prepare(batch.tickets)
                with self._cond:
                    stopped = self._stopping
                    if not stopped:
                        self._next_batch = batch
                        self._cond.notify_all()
                if stopped:
                    # the engine stopped while this batch was being prepared: it is in
                    # neither the queue nor _next_batch, so nobody else will answer it
                    self._post(_Outcome(batch.tickets, error_type=EngineError,
                                        error_message="the engine stopped"))  # fmt: skip
                    return
        except BaseException:
            log.exception("batch former thread failed")
            self._fail_everything("the batch former failed")
            raise

    def _cut_next_batch(self) -> _Batch | None:
        """Block until a batch can be handed over; None when stopping."""
        with self._cond:
            while True:
                while not self._stopping and (self._next_batch is not None or not self._batcher):
                    self._cond.wait()
                if self._stopping:
                    return None
                self._wait_while_idle()
                if self._stopping:
                    return None
                formed = self._batcher.next_batch(time.time())
                if formed.expired:
                    self._post(
                        _Outcome(
                            formed.expired,
                            error_type=DeadlineExceeded,
                            error_message="the request's deadline passed in the queue",
                        )
                    )
                if formed.items:
                    return _Batch(formed.items, formed.cost)

    def _wait_while_idle(self) -> None:
        """With the model idle, less than a batch queued and more requests being
        tokenized, wait up to max_wait_ms for them.

        Called with the condition held. Under load (model busy) there is no wait: the
        next batch is cut at once and runs as soon as the model is free. A lone request
        (nothing else being tokenized) does not wait either: nothing is coming.
        """
        wait_s = self.settings.max_wait_ms / 1000.0
        while (
            not self._stopping
            and not self._busy
            and self._tokenizing > 0
            and not self._batcher.would_fill_batch()
        ):
            oldest = self._batcher.oldest()
            if oldest is None:
                return
            left = oldest.enqueued + wait_s - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)

    def _prepare(self, tickets: list[_Ticket]) -> object | None:
        prepare = getattr(self._scorer, "prepare", None)
        if prepare is None or not hasattr(self._scorer, "score_prepared"):
            return None
        try:
            return prepare([t.pair for t in tickets])
        except Exception:
            log.warning(
                "preparing a batch failed; the inference thread will build it", exc_info=True
            )
            return None

    # ---- inference thread ---------------------------------------------------------

    def _inference_main(self) -> None:
        """Warm up, then run batches until stopped, one queued ahead when the scorer can."""
        if not self._warm_up():
            return
        in_flight: _Launched | None = None
        while True:
            batch = self._take_batch(in_flight)
            if batch is None and in_flight is None:
                return  # stopping
            try:
                if in_flight is not None and batch is not None and not self._launchable(batch):
                    self._finish(in_flight)  # before a batch that runs synchronously
                    in_flight = None
                launched = self._start_batch(batch) if batch is not None else None
                if in_flight is not None:
                    self._finish(in_flight)
            except BaseException as exc:
                log.exception("inference thread failed")
                lost = (batch.tickets if batch else []) + (in_flight.tickets if in_flight else [])
                self._post(
                    _Outcome(
                        lost,
                        error_type=EngineError,
                        error_message=f"inference failed: {type(exc).__name__}",
                    )
                )
                self._fail_everything("the inference thread failed")
                raise
            in_flight = launched
            if in_flight is None:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _take_batch(self, in_flight: _Launched | None) -> _Batch | None:
        """The next cut batch. With nothing in flight, waits for one; with a batch in
        flight, waits only while that batch runs. None when stopping or none came."""
        with self._cond:
            while self._next_batch is None and not self._stopping:
                if in_flight is None:
                    self._cond.wait()
                elif self._device_done(in_flight):
                    break
                else:
                    self._cond.wait(IN_FLIGHT_POLL_S)
            if self._stopping or self._next_batch is None:
                return None
            batch = self._next_batch
            self._next_batch = None
            self._busy = True
            self._cond.notify_all()  # the former may cut the next batch now
            return batch

    def _warm_up(self) -> bool:
        assert self._scorer is not None and self._encoder is not None
        try:
            if self.settings.warmup:
                started = time.perf_counter()
                self._scorer.warmup(self._encoder)
                self.stats.warmup_s = time.perf_counter() - started
        except BaseException as exc:
            if not self._warmed.cancelled():
                self._warmed.set_exception(exc)
            return False
        if not self._warmed.cancelled():
            self._warmed.set_result(None)
        return True

    def _launchable(self, batch: _Batch) -> bool:
        """Whether the batch can be queued on the device (else it is scored right away)."""
        return batch.prepared is not None and self._pipelined

    def _device_done(self, launched: _Launched) -> bool:
        """Whether a launched batch's device work has finished (True if unknown)."""
        done = getattr(self._scorer, "done", None)
        if done is None:
            return True
        try:
            return bool(done(launched.handle))
        except Exception:  # the device's error surfaces in collect(), where it is handled
            return True

    def _start_batch(self, batch: _Batch) -> _Launched | None:
        """Queue the batch's device work if the scorer can; else score it right away."""
        live = self._live_tickets(batch.tickets)
        if not live:
            return None
        prepared = batch.prepared if len(live) == len(batch.tickets) else None
        if prepared is None or not self._launchable(batch):
            self._score_chunk(live, prepared)
            return None
        started = time.perf_counter()
        try:
            return _Launched(live, self._scorer.launch(prepared), started)  # type: ignore[union-attr]
        except Exception as exc:
            if not is_out_of_memory(exc):
                self._post_failure(live, exc)
                return None
        self._after_out_of_memory(live)  # outside the except block: frees the attempt
        return None

    def _finish(self, launched: _Launched) -> None:
        """Wait for a queued batch and post its results."""
        assert self._scorer is not None
        tickets = launched.tickets
        try:
            logits = list(self._scorer.collect(launched.handle))  # type: ignore[attr-defined]
            scores = self._checked_scores(tickets, logits)
        except Exception as exc:
            self._post_failure(tickets, exc)
            return
        # The device ran the previous batch first: count this one's time from the later
        # of its launch and the previous batch's end.
        started = max(launched.started, self._last_batch_end)
        self._deliver_scored(tickets, logits, scores, started)

    def _live_tickets(self, tickets: list[_Ticket]) -> list[_Ticket]:
        """Tickets still wanted; those whose deadline passed are answered here."""
        now = time.time()
        live = [t for t in tickets if not t.request.done]
        expired = [t for t in live if t.deadline is not None and t.deadline <= now]
        if expired:
            self._post(
                _Outcome(
                    expired,
                    error_type=DeadlineExceeded,
                    error_message="the request's deadline passed in the queue",
                )
            )
            live = [t for t in live if t.deadline is None or t.deadline > now]
        return live

    def _checked_scores(self, tickets: list[_Ticket], logits: list[float]) -> list[float]:
        assert self._scorer is not None
        if len(logits) != len(tickets):
            raise RuntimeError(f"scorer gave {len(logits)} logits for {len(tickets)} pairs")
        return list(self._scorer.calibrate(logits))

    def _post_failure(self, tickets: list[_Ticket], exc: Exception) -> None:
        log.error("scoring a batch of %d pairs failed", len(tickets), exc_info=exc)
        self._post(
            _Outcome(
                tickets,
                error_type=EngineError,
                error_message=f"scoring failed: {type(exc).__name__}: {exc}",
            )
        )

    def _deliver_scored(
        self, tickets: list[_Ticket], logits: list[float], scores: list[float], started: float
    ) -> None:
        ended = time.perf_counter()
        self._last_batch_end = ended
        self._maybe_raise_budget()
        seconds = ended - started
        batch_id = next(self._batch_ids)
        self._record_batch(tickets, seconds, started)
        self._post(_Outcome(tickets, logits, scores, batch_id=batch_id, seconds=seconds))

    def _score_chunk(self, tickets: list[_Ticket], prepared: object | None) -> None:
        """Score ``tickets`` and post their results; on out-of-memory split in halves."""
        assert self._scorer is not None
        pairs = [t.pair for t in tickets]
        started = time.perf_counter()
        try:
            if prepared is not None:
                logits = list(self._scorer.score_prepared(prepared))  # type: ignore[attr-defined]
            else:
                logits = list(self._scorer.score(pairs))
            scores = self._checked_scores(tickets, logits)
        except Exception as exc:
            if not is_out_of_memory(exc):
                self._post_failure(tickets, exc)
                return
        else:
            self._deliver_scored(tickets, logits, scores, started)
            return
        # Retried outside the except block, so the failed attempt's tensors (held by
        # the traceback) are freed first.
        self._after_out_of_memory(tickets)

    def _after_out_of_memory(self, tickets: list[_Ticket]) -> None:
        self._empty_device_cache()
        lowered = self._lower_budget()
        if len(tickets) == 1:
            log.warning(
                "out of memory on a single pair of %d tokens (answered with an error); "
                "max_batch_tokens now %d",
                tickets[0].tokens,
                lowered,
            )
            self._post(
                _Outcome(
                    tickets,
                    error_type=EngineError,
                    error_message=f"out of memory scoring one pair of {tickets[0].tokens} tokens",
                )
            )
            return
        self.stats.oom_splits += 1
        if self._metrics is not None:
            self._metrics.oom_splits.inc()
        log.warning(
            "out of memory on a batch of %d pairs: split in halves; max_batch_tokens now %d",
            len(tickets),
            lowered,
        )
        half = len(tickets) // 2
        self._score_chunk(tickets[:half], None)
        self._score_chunk(tickets[half:], None)

    def _lower_budget(self) -> int:
        with self._cond:
            current = self._batcher.max_batch_tokens
            floor = min(current, self.settings.min_batch_tokens)
            lowered = max(floor, int(current * self.settings.oom_budget_factor))
            self._batcher.max_batch_tokens = lowered
        self._batches_since_lowered = 0
        self._publish_budget(lowered)
        return lowered

    def _maybe_raise_budget(self) -> None:
        """After enough good batches at a lowered budget, give back one step of it."""
        configured = self.settings.max_batch_tokens
        if self._batcher.max_batch_tokens >= configured:
            return
        self._batches_since_lowered += 1
        if self._batches_since_lowered < self.settings.oom_recovery_batches:
            return
        self._batches_since_lowered = 0
        with self._cond:
            current = self._batcher.max_batch_tokens
            step_up = int(current / self.settings.oom_budget_factor)
            raised = min(configured, max(current + 1, step_up))
            self._batcher.max_batch_tokens = raised
        log.info(
            "max_batch_tokens raised to %d after %d batches without running out of memory",
            raised,
            self.settings.oom_recovery_batches,
        )
        self._publish_budget(raised)

    def _publish_budget(self, value: int) -> None:
        if self._metrics is not None:
            self._metrics.max_batch_tokens.set(value)

    def _record_batch(self, tickets: list[_Ticket], seconds: float, started: float) -> None:
        cost = self._batch_cost(tickets)
        real = sum(t.tokens for t in tickets)
        self.stats.batches += 1
        self.stats.pairs_scored += len(tickets)
        self.stats.real_tokens += real
        self.stats.cost_tokens += cost
        if self._batch_observer is not None:
            try:
                self._batch_observer([t.pair for t in tickets], seconds)
            except Exception:
                log.warning("batch observer failed", exc_info=True)
        metrics = self._metrics
        if metrics is None:
            return
        metrics.batch_pairs.observe(len(tickets))
        metrics.batch_tokens.observe(cost)
        if cost > 0:
            metrics.padding_ratio.observe(max(0.0, 1.0 - real / cost))
        metrics.inference.observe(seconds)
        metrics.pairs.inc(len(tickets))
        metrics.tokens.inc(real)
        truncated = sum(1 for t in tickets if t.pair.truncated)
        if truncated:
            metrics.truncated_pairs.inc(truncated)
        for ticket in tickets:
            metrics.queue_wait.observe(max(0.0, started - ticket.enqueued))
        memory = _device_memory(self._device)
        if memory is not None:
            metrics.gpu_memory.labels(kind="allocated").set(memory[0])
            metrics.gpu_memory.labels(kind="reserved").set(memory[1])

    # ---- shared helpers -----------------------------------------------------------

    @property
    def _device(self) -> str:
        return str(getattr(self._scorer, "device", "cpu"))

    def _batch_cost(self, tickets: Sequence[_Ticket]) -> int:
        assert self._scorer is not None
        return int(self._scorer.padded_cost([t.pair for t in tickets]))

    def _empty_device_cache(self) -> None:
        torch: Any = sys.modules.get("torch")
        if torch is not None and self._device.startswith("cuda"):
            try:
                torch.cuda.empty_cache()
            except Exception:
                log.debug("torch.cuda.empty_cache failed", exc_info=True)

    def _post(self, outcome: _Outcome) -> None:
        """Send an outcome to the event loop (from a worker thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._deliver, outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("event loop closed; dropped the results of %d pairs", len(outcome.tickets))

    def _fail_everything(self, reason: str) -> None:
        """A worker thread died: stop and fail every pending pair."""
        with self._cond:
            self._stopping = True
            pending = self._batcher.drain()
            if self._next_batch is not None:
                pending.extend(self._next_batch.tickets)
                self._next_batch = None
            self._cond.notify_all()
        self._ready = False
        if pending:
            self._post(_Outcome(pending, error_type=EngineError, error_message=reason))


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


def _device_memory(device: str) -> tuple[int, int] | None:
    """(allocated, reserved) bytes of torch's CUDA allocator, or None off CUDA."""
    if not device.startswith("cuda"):
        return None
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device))
    except Exception:
        return None
