"""The interface between the Kafka service and the scoring engine.

The service (:mod:`consumer.service`) only ever talks to an object that satisfies
:class:`RerankEngine`; the real engine (:class:`consumer.engine.engine.Engine`) and the
fakes used in tests both implement it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the service imports this module without the tokenizer's packages
    from consumer.runtime.prompt import Window


class EngineError(Exception):
    """Base class of errors the engine reports for one request."""

    code = "internal"
    retriable = True


class DeadlineExceeded(EngineError):
    """The request's deadline passed before its pairs reached the model."""

    code = "deadline_exceeded"
    retriable = False


class InvalidRequest(EngineError):
    """The request cannot be scored as given (e.g. its query leaves no room for a document)."""

    code = "invalid_request"
    retriable = False


class EngineClosed(EngineError):
    """The engine is shutting down and takes no more work."""

    code = "internal"
    retriable = True


class EngineFailed(EngineError):
    """The engine cannot score any more (the model keeps failing, or stopped making
    progress). The request is not at fault: the service leaves it for another worker
    instead of answering it with an error."""

    code = "internal"
    retriable = True


@dataclass(frozen=True)
class ScoreRequest:
    """One rerank request, already validated.

    ``deadline`` is an absolute Unix time in seconds (``time.time()`` clock), or None.
    ``truncate=False``: a document that does not fit the model's token limit makes the
    request an :class:`InvalidRequest` instead of being cut.
    ``split_long_documents``: score a document that does not fit as overlapping windows
    that do, the document taking its best window's score (True), or cut it (False);
    None: the engine's default (:attr:`EngineSettings.split_long_documents`).
    """

    query: str
    documents: tuple[str, ...]
    instruction: str | None = None
    deadline: float | None = None
    truncate: bool = True
    split_long_documents: bool | None = None


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """One model call that scored pairs of a request, shared by every request it held.

    ``start_ns``/``end_ns`` are wall-clock Unix epoch nanoseconds (what traces need);
    ``seconds`` is the same span measured on ``time.perf_counter``. ``pairs``, ``tokens``
    (real) and ``cost_tokens`` (the scorer's cost) count the whole batch.
    """

    batch_id: int
    start_ns: int
    end_ns: int
    seconds: float
    pairs: int
    tokens: int
    cost_tokens: int


@dataclass(frozen=True)
class ScoreResult:
    """Scores for every document of one request, in the request's order.

    ``logits`` are raw relevance logits (for Qwen3-Reranker: logit_yes - logit_no);
    ``scores`` are the calibrated relevance scores in [0, 1] (sigmoid of the logit
    for cross-encoders).

    ``batches``: the model calls that scored this request's pairs, in the order they
    finished (empty when the engine does not report them).

    ``windows``: for each document, the window whose score it got when it was split into
    windows, else None; empty when no document was split. ``prompt_tokens`` counts every
    window.
    """

    logits: tuple[float, ...]
    scores: tuple[float, ...]
    prompt_tokens: int
    truncated: tuple[bool, ...]
    queue_ms: float
    inference_ms: float
    extra: dict[str, float] = field(default_factory=dict)
    batches: tuple[BatchTiming, ...] = ()
    windows: tuple[Window | None, ...] = ()


class RerankEngine(Protocol):
    """What the service needs from a scoring engine."""

    @property
    def model_name(self) -> str:
        """The model id reported in replies and in the model-info metric."""
        ...

    @property
    def ready(self) -> bool:
        """True once the model is loaded and warmed up."""
        ...

    @property
    def in_flight_pairs(self) -> int:
        """Pairs accepted but not yet resolved."""
        ...

    @property
    def failure(self) -> str | None:
        """Why the engine cannot score any more; None while it works.

        Once set it stays: every pending and later :meth:`score` raises
        :class:`EngineFailed`, and the process should step aside.
        """
        ...

    async def start(self) -> None:
        """Load the model, warm it up and start the inference thread."""
        ...

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Score every document of ``request``; raises :class:`EngineError`."""
        ...

    async def close(self) -> None:
        """Fail pending work with :class:`EngineClosed` and stop the thread."""
        ...
