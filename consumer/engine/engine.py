"""The scoring engine as the event loop sees it: start, score, close, readiness.

Data flow of one request (:meth:`Engine.score`)::

    event loop --encode in a tokenizer thread--> pairs --> RequestTable --> BatchQueue
                                                                              |
      batch former thread (consumer.engine.former): cuts and prepares batch k+1 ...
                                                                              |
      ... while the inference thread (consumer.engine.inference) runs batch k
          --> Outcome --call_soon_threadsafe--> RequestTable.deliver (event loop)

* The event loop never runs torch or the tokenizer.
* A short ``max_wait_ms`` (for requests still being tokenized) applies only while the
  model is idle. With the model busy, the next batch is cut just before the model is due
  to need it (``late_cut``, :mod:`consumer.engine.pacing`), so it takes what waits by
  then and batches still go back to back.
* Every queued pair is resolved exactly once, with a score or an error, whatever
  happens to its batch; ``close()`` fails everything pending with :class:`EngineClosed`.
* Expired pairs are dropped before they reach the model.
* An engine whose model is broken (it fails its check batch, a worker thread dies, or
  it has work but finishes no batch for ``engine_stall_timeout_s``) fails for good: every
  pending and later request gets :class:`EngineFailed`, and :attr:`Engine.failure`
  says why, so the service can step aside.

Payloads are opaque here and the batch cost comes from the scorer, so packed
(padding-free) batches or prefix reuse change only the scorer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from consumer.engine.api import (
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    EngineFailed,
    InvalidRequest,
    ScoreRequest,
    ScoreResult,
)
from consumer.engine.batcher import TokenBudgetBatcher
from consumer.engine.former import BatchFormer
from consumer.engine.handoff import BatchQueue
from consumer.engine.inference import InferenceLoop
from consumer.engine.metrics import EngineMetrics, EngineStats, NoMetrics
from consumer.engine.requests import RequestTable, score_result
from consumer.engine.settings import EngineSettings
from consumer.engine.work import Outcome, PendingRequest, Ticket, failure
from consumer.runtime.prompt import EncodedPair, PromptEncoder, PromptTooLong
from consumer.runtime.scorer import Scorer

if TYPE_CHECKING:  # the loader imports torch; the engine does not
    from consumer.runtime.loader import LoadedModel

log = logging.getLogger(__name__)

# An error about documents too long for the model names at most this many of them.
_INDICES_SHOWN = 50


class Engine:
    """A :class:`consumer.engine.api.RerankEngine` over a prompt encoder and a scorer.

    ``name`` is the model id reported in replies; ``metrics`` receives batch reports
    (the service's Prometheus metrics, or nothing).
    """

    def __init__(
        self,
        encoder: PromptEncoder,
        scorer: Scorer,
        name: str,
        settings: EngineSettings | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.settings = settings or EngineSettings()
        self.stats = EngineStats()
        self._encoder = encoder
        self._scorer = scorer
        self._name = name
        self._metrics: EngineMetrics = metrics if metrics is not None else NoMetrics()
        batcher: TokenBudgetBatcher[Ticket] = TokenBudgetBatcher(
            max_batch_tokens=self.settings.max_batch_tokens,
            max_batch_pairs=self.settings.max_batch_pairs,
            cost=self._batch_cost,
            window_pairs=self.settings.window_pairs,
            # packed batches cost no padding: keep each request's pairs together instead
            by_length=not scorer.traits.packed,
            quick_backlog=self.settings.quick_batch_backlog,
        )
        self._queue = BatchQueue(
            batcher,
            self.settings.max_wait_ms / 1000.0,
            late_cut=self.settings.late_cut,
            late_cut_margin_s=self.settings.late_cut_margin_ms / 1000.0,
        )
        self._requests = RequestTable(self._queue)
        self._inference = InferenceLoop(
            self._queue,
            scorer,
            encoder,
            self.settings,
            self._metrics,
            self.stats,
            self._post,
            self._fail_from_thread,
        )
        self._former = BatchFormer(self._queue, scorer, self._post, self._fail_from_thread)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokenizer_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._threads: list[threading.Thread] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._started = False
        self._ready = False
        self._closed = False
        self._failure: str | None = None
        # the default applies only where the encoder can split; a request that asks
        # for it explicitly of another encoder is refused
        self._splits = hasattr(encoder, "encode_windows")
        if self.settings.split_long_documents and not self._splits:
            log.warning(
                "split_long_documents is on but %s cannot split documents: they are cut",
                type(encoder).__name__,
            )

    @classmethod
    def for_model(
        cls,
        model: LoadedModel,
        settings: EngineSettings | None = None,
        metrics: EngineMetrics | None = None,
    ) -> Engine:
        """The engine over a model from :func:`consumer.runtime.loader.load_model`."""
        return cls(model.encoder, model.scorer, model.name, settings, metrics)

    # ---- RerankEngine -------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The model id reported in replies."""
        return self._name

    @property
    def ready(self) -> bool:
        """True once the model is warmed up, until close() or a failure."""
        return self._ready

    @property
    def failure(self) -> str | None:
        """Why the engine failed for good (broken model, dead thread, stall); else None."""
        return self._failure

    @property
    def in_flight_pairs(self) -> int:
        """Pairs accepted (tokenized and queued) and not yet resolved."""
        return self._requests.in_flight_pairs

    @property
    def max_batch_tokens(self) -> int:
        """The current token budget (lower than the setting after an out-of-memory)."""
        return self._queue.max_batch_tokens

    async def start(self) -> None:
        """Warm the model up on the inference thread, then start batching."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.tokenizer_threads, thread_name_prefix="rerank-tokenize"
        )
        self._threads = [
            threading.Thread(target=self._inference.run, name="rerank-inference", daemon=True),
            threading.Thread(target=self._former.run, name="rerank-batcher", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        await self._wait_for_warm_up()
        self._ready = True
        self._watchdog = asyncio.create_task(self._watch_for_stalls())
        traits = self._scorer.traits
        self._metrics.token_budget_changed(self._queue.max_batch_tokens)
        self._metrics.model_started(self._name, traits.kind, traits.device, traits.dtype)
        log.info(
            "engine ready: model=%s max_batch_tokens=%d max_batch_pairs=%d quick_batch_cost=%d",
            self._name,
            self._queue.max_batch_tokens,
            self._queue.max_batch_pairs,
            self._queue.quick_batch_cost,
        )

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Score every document of ``request``, in order; raises :class:`EngineError`."""
        self._check_open()
        if _expired(request.deadline):
            raise DeadlineExceeded("the request's deadline passed before it was scored")
        if not request.documents:
            return ScoreResult((), (), 0, (), 0.0, 0.0)
        started = time.perf_counter()
        self._queue.tokenizing(+1)
        try:
            pairs = await self._encode(request)
            tokenize_s = time.perf_counter() - started
            self._check_open()
            if _expired(request.deadline):
                raise DeadlineExceeded("the request's deadline passed while it was tokenized")
            if not request.truncate:
                self._refuse_truncation(pairs)
        except BaseException:
            self._queue.tokenizing(-1)
            raise
        pending = self._open(pairs, request.deadline)
        await self._wait_for(pending)
        result = score_result(pending, pairs, tokenize_s)
        return best_windows(result, pairs) if len(pairs) > len(request.documents) else result

    async def close(self) -> None:
        """Fail pending work with :class:`EngineClosed` and stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._ready = False
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._queue.stop()
        self._requests.fail_all(EngineClosed, "the engine is shutting down")
        self._inference.warmed.cancel()  # a start() still warming up stops waiting
        if self._tokenizer_pool is not None:
            self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        if self._threads:
            # The inference thread may be inside a long batch: join off the loop.
            await asyncio.get_running_loop().run_in_executor(None, self._join_threads)
        log.info("engine closed")

    # ---- event loop side ------------------------------------------------------------

    async def _wait_for_warm_up(self) -> None:
        try:
            await asyncio.wrap_future(self._inference.warmed)
        except asyncio.CancelledError:
            if self._closed:  # close() was called during the warm-up
                raise EngineClosed("the engine was closed during its warm-up") from None
            raise
        except Exception as exc:
            await self.close()
            raise EngineError(f"model warm-up failed: {type(exc).__name__}: {exc}") from exc

    def _check_open(self) -> None:
        if self._failure is not None:
            raise EngineFailed(self._failure)
        if self._closed:
            raise EngineClosed("the engine is shutting down")
        if not self._ready:
            raise EngineError("the engine is not started")

    async def _encode(self, request: ScoreRequest) -> list[EncodedPair]:
        assert self._tokenizer_pool is not None
        loop = asyncio.get_running_loop()
        encode = self._encoding_for(request)
        try:
            pairs = await loop.run_in_executor(
                self._tokenizer_pool,
                encode,
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
        documents = len(document_groups(pairs))
        if documents != len(request.documents):
            raise EngineError(
                f"encoder gave pairs for {documents} documents, not {len(request.documents)}"
            )
        return pairs

    def _encoding_for(self, request: ScoreRequest) -> Callable[..., list[EncodedPair]]:
        """The encoder's ``encode``, or its ``encode_windows`` when the request's documents
        that do not fit are to be split (the request says, else the engine's default)."""
        split = request.split_long_documents
        if split is None:
            split = self.settings.split_long_documents and self._splits
        if not split:
            return self._encoder.encode
        encode_windows = getattr(self._encoder, "encode_windows", None)
        if encode_windows is None:
            raise InvalidRequest("this model's prompt encoder cannot split long documents")
        return functools.partial(
            encode_windows,
            overlap=self.settings.window_overlap_tokens,
            max_windows=self.settings.max_windows_per_document,
        )

    def _refuse_truncation(self, pairs: list[EncodedPair]) -> None:
        """InvalidRequest naming the documents the encoder cut (``truncate=false``).

        The encoder's own flags, so the documents are tokenized once either way."""
        groups = document_groups(pairs)
        cut = [i for i, group in enumerate(groups) if any(pairs[k].truncated for k in group)]
        if not cut:
            return
        limit = getattr(self._encoder, "limit_description", "the model's token limit")
        shown = ", ".join(str(i) for i in cut[:_INDICES_SHOWN])
        if len(cut) > _INDICES_SHOWN:
            shown += f", ... ({len(cut) - _INDICES_SHOWN} more)"
        raise InvalidRequest(
            f"{len(cut)} of {len(groups)} documents do not fit {limit} and truncate is false: "
            f"documents [{shown}]"
        )

    def _open(self, pairs: list[EncodedPair], deadline: float | None) -> PendingRequest:
        assert self._loop is not None
        pending = self._requests.open(self._loop, pairs, deadline)
        if pending is not None:
            return pending
        # stopped meanwhile: nothing would ever score these
        if self._failure is not None:
            raise EngineFailed(self._failure)
        if self._closed:
            raise EngineClosed("the engine is shutting down")
        raise EngineError("the engine stopped")

    async def _wait_for(self, pending: PendingRequest) -> None:
        try:
            if pending.deadline is None:
                await pending.future
            else:
                async with asyncio.timeout(max(0.0, pending.deadline - time.time())):
                    await pending.future
        except TimeoutError:
            self._requests.abandon(pending)
            raise DeadlineExceeded(
                "the request's deadline passed before all pairs were scored"
            ) from None
        except asyncio.CancelledError:
            self._requests.abandon(pending)
            raise

    def _join_threads(self) -> None:
        deadline = time.monotonic() + self.settings.close_timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("thread %s did not stop within the close timeout", thread.name)

    # ---- called from the worker threads --------------------------------------------------

    def _batch_cost(self, tickets: Sequence[Ticket]) -> int:
        return int(self._scorer.batch_cost([t.pair for t in tickets]))

    def _post(self, outcome: Outcome) -> None:
        """Send an outcome to the event loop."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._requests.deliver, outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("event loop closed; dropped the results of %d pairs", len(outcome.tickets))

    def _fail_from_thread(self, reason: str) -> None:
        """Fail the engine for good (from a worker thread: also when one died, as nothing
        would score what is queued any more)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._fail, reason)
        except RuntimeError:  # the loop is closed
            log.debug("event loop closed; engine failure not reported: %s", reason)

    def _fail(self, reason: str) -> None:
        """Fail the engine for good: stop the threads' queue and answer everything pending
        with :class:`EngineFailed` (on the event loop)."""
        if self._failure is not None or self._closed:
            return
        self._failure = reason
        self._ready = False
        log.error("engine failed; it takes no more requests", extra={"reason": reason})
        pending = self._queue.stop()
        if pending:
            self._requests.deliver(failure(pending, EngineFailed, reason))
        self._requests.fail_all(EngineFailed, reason)

    async def _watch_for_stalls(self) -> None:
        """Fail the engine when the model has work but finishes no batch for too long."""
        limit = self.settings.engine_stall_timeout_s
        while self._failure is None:
            await asyncio.sleep(min(1.0, limit / 4))
            stalled = self._inference.stalled_for()
            if stalled > limit:
                self._fail(f"the model has not finished a batch for {stalled:.0f} s")


def document_groups(pairs: Sequence[EncodedPair]) -> list[range]:
    """Which pairs belong to which document, in order: one pair a document, or one a
    window of a document split into windows (:attr:`EncodedPair.window`)."""
    groups: list[range] = []
    k = 0
    while k < len(pairs):
        window = pairs[k].window
        count = 1 if window is None else window.count
        groups.append(range(k, k + count))
        k += count
    return groups


def best_windows(result: ScoreResult, pairs: Sequence[EncodedPair]) -> ScoreResult:
    """Per-pair results of a request whose documents were split into windows, made
    per-document: each document takes its best window's logit and score (and says which
    window that was), and is truncated when any of its windows is."""
    logits, scores, truncated, windows = [], [], [], []
    for group in document_groups(pairs):
        best = max(group, key=result.logits.__getitem__)
        logits.append(result.logits[best])
        scores.append(result.scores[best])
        truncated.append(any(result.truncated[k] for k in group))
        windows.append(pairs[best].window)
    return dataclasses.replace(
        result,
        logits=tuple(logits),
        scores=tuple(scores),
        truncated=tuple(truncated),
        windows=tuple(windows),
    )


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline
