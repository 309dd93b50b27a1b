"""Wire contract v1 as pure functions: request records in, reply records out.

No Kafka and no torch here, so every rule of the contract is unit-testable and the
hot path stays cheap (orjson + one pydantic validation per request).

Decisions the architecture left open, made here:

* Correlation id: the ``correlation-id`` header, else the body's ``id``. When both are
  present and differ, **the header wins** (the SDK waits on the header id); the body's
  ``id`` stays in ``DecodedRequest.request.id`` untouched.
* A header that is present but unusable (not UTF-8, empty, too long, not an integer)
  makes the request invalid (``invalid_request``). A bad ``correlation-id`` header
  is treated as absent when choosing whom to answer: the body's ``id`` if it has a
  usable one, else nobody (``Rejection.correlation_id is None`` -> dead-letter topic).
  When a header appears more than once, the first occurrence counts.
* Every size limit (record bytes, number of documents, query / instruction /
  document characters) is ``payload_too_large``; shape and type errors are
  ``invalid_request``. Neither is retriable.
* An oversized record is not parsed at all (parsing it is the cost the limit avoids),
  so its correlation id can only come from the header.
* A bad ``reply-topic`` / ``reply-partition`` header cannot be used to route the
  rejection; the rejection then goes to the service's default reply topic.
* Whether a deadline has passed is the service's call (it owns the clock); this module
  only parses ``deadline-ms`` (absolute Unix epoch milliseconds) into epoch seconds.
* Callers in Spring Kafka's or CloudEvents' header convention
  (:mod:`consumer.service.conventions`): where our own header is absent, the correlation id
  is ``kafka_correlationId`` (as hex), then the body's ``id``, then ``ce_id``; the reply
  topic and partition are ``kafka_replyTopic`` and ``kafka_replyPartition``. The caller's
  convention travels with the decoded request (``convention``) to :func:`reply_headers`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
from pydantic import Field, ValidationError
from pydantic.dataclasses import dataclass as checked_dataclass

from consumer.engine.api import ScoreResult
from consumer.service.conventions import (
    NATIVE,
    SPRING_REPLY_TOPIC,
    Convention,
    Inbound,
    read_inbound,
    reply_extra_headers,
)
from schemas.models import (
    DLQ_HEADER_ERROR_CODE,
    DLQ_HEADER_ERROR_MESSAGE,
    DLQ_HEADER_SOURCE_OFFSET,
    DLQ_HEADER_SOURCE_PARTITION,
    DLQ_HEADER_SOURCE_SIZE,
    DLQ_HEADER_SOURCE_TOPIC,
    DLQ_HEADERS,
    HEADER_CORRELATION_ID,
    HEADER_DEADLINE_MS,
    HEADER_REPLY_PARTITION,
    HEADER_REPLY_TOPIC,
    MAX_ID_CHARS,
    ErrorCode,
    RerankRequest,
)


class Window(Protocol):
    """Which window of a document split to fit the model scored best (the engine's
    results carry the runtime's; the reply shows its fields)."""

    @property
    def index(self) -> int: ...

    @property
    def count(self) -> int: ...

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


# Kafka's own rules for topic names.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_PARTITION = re.compile(r"[0-9]{1,10}")
_MAX_PARTITION = 2**31 - 1
# Up to 18 digits: every epoch-ms value of the next 30 million years, and never a
# giant integer to parse.
_DEADLINE_MS = re.compile(r"[0-9]{1,18}")
# Messages quote at most this much of anything the producer sent (field names, ids).
_QUOTE_CHARS: Final = 64
_MAX_MESSAGE_CHARS: Final = 1000
_MAX_VALIDATION_ERRORS_SHOWN: Final = 3

_REQUEST_FIELDS: Final = tuple(RerankRequest.model_fields)


# Dead-letter records only (never in a reply): the record was started max_record_attempts
# times and never finished, so it is not processed again (consumer.service.attempts).
POISON_RECORD = "poison_record"
DEAD_LETTER_CODES = frozenset({*(c.value for c in ErrorCode), POISON_RECORD})


@checked_dataclass(frozen=True)
class RequestLimits:
    """Size limits of one request; exceeding any of them is ``payload_too_large``.

    ``None`` disables a character limit.
    """

    max_documents: int = Field(default=1000, gt=0)
    max_request_bytes: int = Field(default=4_000_000, gt=0)
    max_query_chars: int | None = Field(default=10_000, gt=0)
    max_instruction_chars: int | None = Field(default=10_000, gt=0)
    max_document_chars: int | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class ReplyRoute:
    """Where a reply goes: ``topic=None`` is the service's default reply topic,
    ``partition=None`` lets the producer's partitioner choose (by key)."""

    topic: str | None = None
    partition: int | None = None


DEFAULT_ROUTE: Final = ReplyRoute()


@dataclass(frozen=True)
class DecodedRequest:
    """A valid request, ready for the engine.

    ``deadline`` is absolute Unix time in seconds (``time.time()`` clock), or None.
    """

    correlation_id: str
    request: RerankRequest
    route: ReplyRoute
    deadline: float | None
    convention: Convention = NATIVE


@dataclass(frozen=True)
class Rejection:
    """A request that gets an error instead of results.

    ``correlation_id is None`` means nobody can be answered: the service copies the
    record to the dead-letter topic (with :func:`dlq_headers`).
    """

    correlation_id: str | None
    route: ReplyRoute
    code: ErrorCode
    message: str
    retriable: bool = False
    convention: Convention = NATIVE


class _Invalid(Exception):
    """Internal: a request fails a rule; carries the error code and message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- decoding


def decode_request(
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    limits: RequestLimits,
) -> DecodedRequest | Rejection:
    """Decode and validate one request record; never raises for bad input.

    Returns a :class:`DecodedRequest`, or a :class:`Rejection` that says whom to
    answer (if anyone), where, and why.
    """
    header_map = _first_headers(headers)
    inbound = read_inbound(header_map)
    header_id, header_id_error = _header_correlation_id(header_map)
    route, route_error = _route(header_map, inbound)
    deadline, deadline_error = _deadline(header_map)

    body = _parse_body(value, limits)
    body_id = _usable_body_id(body) if isinstance(body, dict) else None
    correlation_id = _first_not_none(header_id, inbound.correlation_id, body_id, inbound.ce_id)
    convention = inbound.convention

    def reject(code: ErrorCode, message: str) -> Rejection:
        clipped = _clip(message, _MAX_MESSAGE_CHARS)
        return Rejection(correlation_id, route, code, clipped, convention=convention)

    first_error = header_id_error or route_error or inbound.error or deadline_error
    if first_error is not None:
        return reject(ErrorCode.INVALID_REQUEST, first_error)
    if isinstance(body, _Invalid):
        return reject(body.code, body.message)
    try:
        _check_limits(body, limits)
        request = RerankRequest.model_validate(body)
    except _Invalid as exc:
        return reject(exc.code, exc.message)
    except ValidationError as exc:
        return reject(ErrorCode.INVALID_REQUEST, describe_validation_error(exc))
    if correlation_id is None:
        return reject(
            ErrorCode.INVALID_REQUEST,
            f"no correlation id: set the '{HEADER_CORRELATION_ID}' header or the body's 'id'",
        )
    return DecodedRequest(correlation_id, request, route, deadline, convention)


def reply_address(
    headers: Iterable[tuple[str, bytes | None]],
) -> tuple[str | None, ReplyRoute, Convention]:
    """The correlation id, reply route and caller's convention from the headers alone (the
    body unread): how to tell a client about a record that must not be decoded again."""
    found = _first_headers(headers)
    inbound = read_inbound(found)
    header_id, _ = _header_correlation_id(found)
    route, _ = _route(found, inbound)
    correlation_id = _first_not_none(header_id, inbound.correlation_id, inbound.ce_id)
    return correlation_id, route, inbound.convention


def _first_not_none(*candidates: str | None) -> str | None:
    return next((c for c in candidates if c is not None), None)


def _first_headers(headers: Iterable[tuple[str, bytes | None]]) -> dict[str, bytes | None]:
    """Header name -> value of its first occurrence."""
    found: dict[str, bytes | None] = {}
    for name, raw in headers:
        found.setdefault(name, raw)
    return found


def _header_text(headers: Mapping[str, bytes | None], name: str) -> str | None:
    """The header's value as text; None when absent; raises _Invalid when not UTF-8."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid(ErrorCode.INVALID_REQUEST, f"header '{name}' is not valid UTF-8") from None


def _header_correlation_id(headers: Mapping[str, bytes | None]) -> tuple[str | None, str | None]:
    """(usable header id or None, error message or None)."""
    try:
        text = _header_text(headers, HEADER_CORRELATION_ID)
    except _Invalid as exc:
        return None, exc.message
    if text is None:
        return None, None
    if not 1 <= len(text) <= MAX_ID_CHARS:
        return None, (
            f"header '{HEADER_CORRELATION_ID}' must have 1 to {MAX_ID_CHARS} characters, "
            f"got {len(text)}"
        )
    return text, None


def _route(headers: Mapping[str, bytes | None], inbound: Inbound) -> tuple[ReplyRoute, str | None]:
    """(reply route, error message or None); a bad part falls back to the default.
    Spring's reply topic and partition count where our own headers are absent."""
    error = None
    topic: str | None = None
    partition: int | None = None
    topic_header = HEADER_REPLY_TOPIC if headers.get(HEADER_REPLY_TOPIC) is not None else None
    try:
        topic = _header_text(headers, HEADER_REPLY_TOPIC)
        if topic is None and inbound.reply_topic is not None:
            topic, topic_header = inbound.reply_topic, SPRING_REPLY_TOPIC
        if topic is not None and not _TOPIC_NAME.fullmatch(topic):
            error = f"header '{topic_header}' is not a valid topic name: {_quote(topic)}"
            topic = None
    except _Invalid as exc:
        error = exc.message
    try:
        text = _header_text(headers, HEADER_REPLY_PARTITION)
        if text is not None:
            if _PARTITION.fullmatch(text) and int(text) <= _MAX_PARTITION:
                partition = int(text)
            else:
                error = error or (
                    f"header '{HEADER_REPLY_PARTITION}' must be an integer >= 0, got {_quote(text)}"
                )
        else:
            partition = inbound.reply_partition
    except _Invalid as exc:
        error = error or exc.message
    return ReplyRoute(topic, partition), error


def _deadline(headers: Mapping[str, bytes | None]) -> tuple[float | None, str | None]:
    """(deadline in epoch seconds or None, error message or None)."""
    try:
        text = _header_text(headers, HEADER_DEADLINE_MS)
    except _Invalid as exc:
        return None, exc.message
    if text is None:
        return None, None
    if not _DEADLINE_MS.fullmatch(text):
        return None, (
            f"header '{HEADER_DEADLINE_MS}' must be an integer (absolute Unix epoch "
            f"milliseconds), got {_quote(text)}"
        )
    return int(text) / 1000.0, None


def _parse_body(value: bytes | None, limits: RequestLimits) -> dict[str, Any] | _Invalid:
    """The record value as a JSON object, or why it is not one."""
    if value is None:
        return _Invalid(ErrorCode.INVALID_REQUEST, "record has no value (tombstone)")
    if len(value) > limits.max_request_bytes:
        return _Invalid(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"request is {len(value)} bytes; the limit is {limits.max_request_bytes}",
        )
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return _Invalid(ErrorCode.INVALID_REQUEST, _json_error_message(value, exc))
    if not isinstance(body, dict):
        return _Invalid(
            ErrorCode.INVALID_REQUEST,
            f"request body must be a JSON object, got {_json_type(body)}",
        )
    return body


def _json_error_message(value: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        bytes(value).decode("utf-8")
    except UnicodeDecodeError as utf8_error:
        return f"request body is not valid UTF-8 (byte offset {utf8_error.start})"
    return f"request body is not valid JSON: {exc}"


def _usable_body_id(body: Mapping[str, Any]) -> str | None:
    """The body's ``id`` when it is a valid correlation id, else None."""
    body_id = body.get("id")
    if isinstance(body_id, str) and 1 <= len(body_id) <= MAX_ID_CHARS:
        return body_id
    return None


def _check_limits(body: Mapping[str, Any], limits: RequestLimits) -> None:
    """Raise _Invalid(payload_too_large) when the body breaks a size limit.

    Runs before model validation so that a huge list is rejected without validating
    every element; values of the wrong type are left to the model's error.
    """
    documents = body.get("documents")
    if isinstance(documents, list):
        if len(documents) > limits.max_documents:
            raise _Invalid(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"documents: {len(documents)} documents; the limit is {limits.max_documents}",
            )
        if limits.max_document_chars is not None:
            for i, doc in enumerate(documents):
                if isinstance(doc, str) and len(doc) > limits.max_document_chars:
                    raise _Invalid(
                        ErrorCode.PAYLOAD_TOO_LARGE,
                        f"documents[{i}]: {len(doc)} characters; "
                        f"the limit is {limits.max_document_chars}",
                    )
    for name, limit in (
        ("query", limits.max_query_chars),
        ("instruction", limits.max_instruction_chars),
    ):
        text = body.get(name)
        if limit is not None and isinstance(text, str) and len(text) > limit:
            raise _Invalid(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"{name}: {len(text)} characters; the limit is {limit}",
            )


# ------------------------------------------------------------------ validation errors


_JSON_TYPE_WORDS: Final = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
}


def describe_validation_error(
    exc: ValidationError, limit: int = _MAX_VALIDATION_ERRORS_SHOWN
) -> str:
    """A short readable summary of a :class:`RerankRequest` validation error, such as
    ``"documents: list should have at least 1 item; top_n: must be an integer, got string"``.
    """
    errors = exc.errors(include_url=False, include_context=True)
    parts = [_describe_one(err) for err in errors[:limit]]
    if len(errors) > limit:
        parts.append(f"{len(errors) - limit} more error(s)")
    return "; ".join(parts)


def _describe_one(err: Mapping[str, Any]) -> str:
    loc = _format_loc(err.get("loc", ()))
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    given = err.get("input")
    if kind == "missing":
        return f"{loc}: field required"
    if kind == "extra_forbidden":
        return f"{loc}: unknown field (allowed: {', '.join(_REQUEST_FIELDS)})"
    if kind in _JSON_TYPE_WORDS:
        return f"{loc}: must be {_JSON_TYPE_WORDS[kind]}, got {_json_type(given)}"
    if kind == "too_short" and isinstance(given, list):
        return f"{loc}: list should have at least {ctx.get('min_length', 1)} item"
    if kind == "string_too_short":
        return f"{loc}: must not be empty"
    if kind == "string_too_long":
        return f"{loc}: must have at most {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return f"{loc}: must not be empty or whitespace only"
    if kind == "greater_than_equal":
        return f"{loc}: must be >= {ctx.get('ge')}"
    message = str(err.get("msg", "invalid"))
    return f"{loc}: {message[:1].lower()}{message[1:]}"


def _format_loc(loc: Iterable[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + _clip(str(part), _QUOTE_CHARS)
    return text or "request"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(text: str) -> str:
    return repr(_clip(text, _QUOTE_CHARS))


# --------------------------------------------------------------------------- encoding


def encode_success(
    correlation_id: str,
    *,
    model: str,
    documents: Sequence[str],
    scores: Sequence[float],
    logits: Sequence[float],
    top_n: int | None,
    return_documents: bool,
    raw_scores: bool,
    prompt_tokens: int,
    queue_ms: float,
    inference_ms: float,
    total_ms: float,
    truncated: Sequence[bool] = (),
    windows: Sequence[Window | None] = (),
) -> bytes:
    """The value of a success reply record.

    Results are sorted by ``relevance_score`` descending (ties: lower index first) and
    cut to ``top_n``; ``relevance_score`` is the calibrated score, or the raw logit when
    ``raw_scores``. ``truncated`` (one flag per document, or empty) becomes the reply's
    ``truncated`` indices, a field left out when no document was cut, so that such replies
    are exactly what they were before the field existed. ``windows`` (one per document,
    or empty) gives the result of a document split into windows its ``window``. Raises
    ValueError when the lengths disagree or a reported number is not finite (a broken
    model: the service answers ``internal`` instead).
    """
    n = len(documents)
    if len(scores) != n or len(logits) != n:
        raise ValueError(f"{n} documents but {len(scores)} scores and {len(logits)} logits")
    if truncated and len(truncated) != n:
        raise ValueError(f"{n} documents but {len(truncated)} truncation flags")
    values = logits if raw_scores else scores
    if not all(math.isfinite(v) for v in values):
        raise ValueError("non-finite relevance score")
    order = sorted(range(n), key=lambda i: -values[i])
    if top_n is not None:
        order = order[:top_n]
    if return_documents:
        results = [
            {"index": i, "relevance_score": float(values[i]), "document": documents[i]}
            for i in order
        ]
    else:
        results = [{"index": i, "relevance_score": float(values[i])} for i in order]
    if any(windows):
        for i, result in zip(order, results, strict=True):
            if (window := windows[i]) is not None:
                result["window"] = {
                    "index": window.index,
                    "count": window.count,
                    "start": window.start,
                    "end": window.end,
                }
    reply: dict[str, Any] = {
        "id": correlation_id,
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": int(prompt_tokens)},
        "timing_ms": {
            "queue": _timing(queue_ms),
            "inference": _timing(inference_ms),
            "total": _timing(total_ms),
        },
    }
    if any(truncated):
        reply["truncated"] = [i for i, cut in enumerate(truncated) if cut]
    return orjson.dumps(reply)


def encode_result(
    decoded: DecodedRequest, model: str, result: ScoreResult, total_ms: float
) -> bytes:
    """:func:`encode_success` for an engine result of a decoded request."""
    req = decoded.request
    return encode_success(
        decoded.correlation_id,
        model=model,
        documents=req.documents,
        scores=result.scores,
        logits=result.logits,
        top_n=req.top_n,
        return_documents=req.return_documents,
        raw_scores=req.raw_scores,
        prompt_tokens=result.prompt_tokens,
        queue_ms=result.queue_ms,
        inference_ms=result.inference_ms,
        total_ms=total_ms,
        truncated=result.truncated,
        windows=result.windows,
    )


def _timing(ms: float) -> float:
    if not math.isfinite(ms):
        raise ValueError(f"non-finite timing: {ms}")
    # A clock step can make a difference slightly negative; timing is informational,
    # so it is clamped rather than failing a good reply.
    return round(max(0.0, float(ms)), 3)


def encode_error(
    correlation_id: str, code: ErrorCode | str, message: str, retriable: bool
) -> bytes:
    """The value of an error reply record; raises ValueError for an unknown code."""
    error_code = ErrorCode(code)
    return orjson.dumps(
        {
            "id": correlation_id,
            "error": {
                "code": error_code.value,
                "message": message,
                "retriable": bool(retriable),
            },
        }
    )


def encode_rejection(rejection: Rejection) -> bytes:
    """:func:`encode_error` for a rejection that has a correlation id."""
    if rejection.correlation_id is None:
        raise ValueError("a rejection without a correlation id goes to the DLQ, not a reply")
    return encode_error(
        rejection.correlation_id, rejection.code, rejection.message, rejection.retriable
    )


def reply_headers(
    correlation_id: str, convention: Convention = NATIVE, *, error: bool = False
) -> list[tuple[str, bytes]]:
    """Headers of a reply record: ``correlation-id``, and what the caller's ``convention``
    needs (``error``: the reply is an error reply)."""
    own = [(HEADER_CORRELATION_ID, correlation_id.encode("utf-8"))]
    return own + reply_extra_headers(convention, correlation_id, error=error)


def dlq_headers(
    code: ErrorCode | str,
    message: str,
    source_topic: str,
    partition: int,
    offset: int,
    source_size: int | None = None,
) -> list[tuple[str, bytes]]:
    """Headers a dead-letter record starts with (the request's own follow).

    ``code`` is an :class:`ErrorCode` or one of the dead-letter-only codes
    (:data:`POISON_RECORD`). ``source_size``: set on a record that leaves the original's
    value out (it was too large to copy): the original's size in bytes.
    """
    text = code.value if isinstance(code, ErrorCode) else str(code)
    if text not in DEAD_LETTER_CODES:
        raise ValueError(f"unknown dead-letter error code {text!r}")
    return [
        (DLQ_HEADER_ERROR_CODE, text.encode("utf-8")),
        (DLQ_HEADER_ERROR_MESSAGE, _clip(message, _MAX_MESSAGE_CHARS).encode("utf-8")),
        (DLQ_HEADER_SOURCE_TOPIC, source_topic.encode("utf-8")),
        (DLQ_HEADER_SOURCE_PARTITION, str(int(partition)).encode("ascii")),
        (DLQ_HEADER_SOURCE_OFFSET, str(int(offset)).encode("ascii")),
    ] + ([(DLQ_HEADER_SOURCE_SIZE, str(int(source_size)).encode("ascii"))] if source_size else [])


def without_dlq_headers(
    headers: Iterable[tuple[str, bytes | None]],
) -> list[tuple[str, bytes | None]]:
    """A request's headers, as they came, without any named like the dead-letter headers:
    a producer must not be able to forge the error code or the source coordinates a
    dead-letter reader trusts."""
    return [(name, value) for name, value in headers if name not in DLQ_HEADERS]
