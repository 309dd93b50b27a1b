"""What a successful rerank call returns, and its parsing from a reply body.

Parsing is lenient about fields it does not know (a newer service may add some)
and strict about the ones it uses: a reply the SDK cannot understand raises
:class:`~producer_sdk.errors.MalformedReply` for that one call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from producer_sdk.errors import MalformedReply, RerankErrorReply


@dataclass(frozen=True, slots=True)
class DocumentWindow:
    """The window of a document split into windows whose score the document got: the
    ``index``-th (from 0) of ``count``, characters ``start`` up to ``end`` of it."""

    index: int
    count: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class RankedDocument:
    """One scored document: ``index`` points into the request's ``documents``;
    ``window``: which window scored it, when it was split into windows."""

    index: int
    score: float
    document: str | None = None
    window: DocumentWindow | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one request."""

    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Timing:
    """Where the service spent the request's time, in milliseconds."""

    queue_ms: float
    inference_ms: float
    total_ms: float


@dataclass(frozen=True, slots=True)
class RerankResult:
    """A ranking: ``results`` sorted by score, best first (cut to ``top_n``).

    ``truncated``: indices (into the request's documents, ascending) of the documents
    the service cut to fit the model's token limit before scoring them, whether or not
    they are among ``results``; empty when none was (or the service is older than the
    field).
    """

    id: str
    model: str
    results: list[RankedDocument]
    usage: Usage
    timing: Timing
    truncated: tuple[int, ...] = ()

    def __iter__(self) -> Iterator[RankedDocument]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, rank: int) -> RankedDocument:
        return self.results[rank]

    @property
    def indices(self) -> list[int]:
        """Indices into the request's documents, best first."""
        return [item.index for item in self.results]

    @property
    def scores(self) -> list[float]:
        """Scores, best first."""
        return [item.score for item in self.results]

    def top(self, n: int) -> list[RankedDocument]:
        """The ``n`` best results."""
        return self.results[:n]

    def with_documents(self, documents: Sequence[str]) -> RerankResult:
        """A copy whose results carry their text, taken from the request's ``documents``."""
        filled = [replace(item, document=documents[item.index]) for item in self.results]
        return replace(self, results=filled)

    def to_dict(self) -> dict[str, Any]:
        """The result in the wire contract's reply shape (JSON-ready)."""
        results: list[dict[str, Any]] = []
        for item in self.results:
            entry: dict[str, Any] = {"index": item.index, "relevance_score": item.score}
            if item.document is not None:
                entry["document"] = item.document
            if item.window is not None:
                entry["window"] = {
                    "index": item.window.index,
                    "count": item.window.count,
                    "start": item.window.start,
                    "end": item.window.end,
                }
            results.append(entry)
        reply: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "results": results,
            "usage": {"prompt_tokens": self.usage.prompt_tokens},
            "timing_ms": {
                "queue": self.timing.queue_ms,
                "inference": self.timing.inference_ms,
                "total": self.timing.total_ms,
            },
        }
        if self.truncated:  # left out when empty, as the service does
            reply["truncated"] = list(self.truncated)
        return reply


def parse_reply(body: Any, document_count: int) -> RerankResult:
    """Turn a decoded reply body into a result, or raise the error it carries.

    Raises :class:`RerankErrorReply` for an error reply and :class:`MalformedReply`
    for a body that follows neither reply shape.
    """
    if not isinstance(body, Mapping):
        raise MalformedReply(f"reply is a JSON {type(body).__name__}, not an object")
    try:
        if "error" in body:
            raise _error_reply(body)
        return RerankResult(
            id=_typed(body, "id", str),
            model=_typed(body, "model", str),
            results=[_ranked(item, document_count) for item in _typed(body, "results", list)],
            usage=Usage(prompt_tokens=_typed(_typed(body, "usage", Mapping), "prompt_tokens", int)),
            timing=_timing(_typed(body, "timing_ms", Mapping)),
            truncated=_truncated(body, document_count),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise MalformedReply(f"reply does not follow the wire contract: {error}") from None


def _error_reply(body: Mapping[str, Any]) -> RerankErrorReply:
    error = _typed(body, "error", Mapping)
    return RerankErrorReply(
        code=_typed(error, "code", str),
        message=_typed(error, "message", str),
        retriable=_typed(error, "retriable", bool),
        request_id=str(body.get("id", "")),
    )


def _ranked(item: Any, document_count: int) -> RankedDocument:
    if not isinstance(item, Mapping):
        raise TypeError("a result is not an object")
    index = _typed(item, "index", int)
    if not 0 <= index < document_count:
        raise ValueError(f"result index {index} is outside the {document_count} documents")
    document = item.get("document")
    if document is not None and not isinstance(document, str):
        raise TypeError("'document' is not a string")
    window = None
    if "window" in item:
        fields = _typed(item, "window", Mapping)
        window = DocumentWindow(
            *(_typed(fields, k, int) for k in ("index", "count", "start", "end"))
        )
    return RankedDocument(
        index=index, score=_number(item, "relevance_score"), document=document, window=window
    )


def _truncated(body: Mapping[str, Any], document_count: int) -> tuple[int, ...]:
    if "truncated" not in body:  # nothing was cut, or a service older than the field
        return ()
    indices = []
    for index in _typed(body, "truncated", list):
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError("'truncated' holds something that is not an integer")
        if not 0 <= index < document_count:
            raise ValueError(f"truncated index {index} is outside the {document_count} documents")
        indices.append(index)
    return tuple(indices)


def _timing(timing: Mapping[str, Any]) -> Timing:
    return Timing(
        queue_ms=_number(timing, "queue"),
        inference_ms=_number(timing, "inference"),
        total_ms=_number(timing, "total"),
    )


def _typed(mapping: Mapping[str, Any], key: str, kind: type) -> Any:
    value = mapping[key]
    # bool is an int in Python; the contract keeps them apart.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key!r} is not a {kind.__name__}")
    return value


def _number(mapping: Mapping[str, Any], key: str) -> float:
    value = mapping[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key!r} is not a number")
    return float(value)
