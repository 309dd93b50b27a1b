"""The HTTP rerank APIs the gateway speaks: how each one's request reads and its answer looks.

Each shape turns a JSON body into one :class:`RerankCall` and a result back into the
JSON its callers expect, and says how it reports an error (status code, error body, in
the API's own field names). The shapes know nothing about HTTP serving or Kafka.

- :class:`CohereV2`: ``POST /v2/rerank`` (Cohere's v2 API; the ``cohere`` SDK's
  ``ClientV2.rerank``).
- :class:`CohereV1`: ``POST /v1/rerank`` (documents may be objects; ``rank_fields``).
- :class:`Tei`: ``POST /rerank`` (Hugging Face text-embeddings-inference, ``texts``).
- :class:`Native`: ``POST /rerank`` with ``documents``: the wire contract's request body
  and reply, ``instruction`` included.

Unknown fields follow each API: Cohere answers 422 ("unknown field: parameter 'x' is not a
valid field"), TEI ignores them (its router's serde structs do), the native shape refuses
them as the worker does over Kafka. TEI's statuses are its router's (v1.9):
``ErrorType`` Validation 422, Empty 400, Overloaded 429, Backend 424, Unhealthy 503, and
its HTTP layer's 400 for a body that is not JSON and 413 for one over the size limit.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePath
from typing import Any, ClassVar, Final

from producer_sdk.errors import InvalidArgument
from producer_sdk.request import OPTION_NAMES, RerankOptions, check_options
from producer_sdk.result import RerankResult
from schemas.models import RerankRequest


class Failure(Enum):
    """What went wrong, independent of the API; each shape has its status and body."""

    MALFORMED = "malformed"  # the body is not JSON
    INVALID = "invalid_request"  # a missing or mistyped field; the worker's invalid_request
    EMPTY = "empty"  # no documents
    UNKNOWN_FIELD = "unknown_field"
    BODY_TOO_LARGE = "body_too_large"  # over --max-body-bytes
    TOO_LARGE = "payload_too_large"  # the worker's payload_too_large
    UNAUTHORIZED = "unauthorized"
    SLOW_BODY = "slow_body"  # the body did not arrive within --body-timeout
    OVERLOADED = "overloaded"
    DEADLINE = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    BAD_REPLY = "bad_reply"


class BadRequest(ValueError):
    """The body does not follow the API's request shape; ``failure`` says how."""

    def __init__(self, message: str, failure: Failure = Failure.INVALID) -> None:
        super().__init__(message)
        self.failure = failure


# The statuses Cohere and the native shape share; invalid input differs between them.
_STATUS: Final = {
    Failure.BODY_TOO_LARGE: 413,
    Failure.TOO_LARGE: 413,
    Failure.UNAUTHORIZED: 401,
    Failure.SLOW_BODY: 408,
    Failure.OVERLOADED: 429,
    Failure.DEADLINE: 504,
    Failure.UNAVAILABLE: 503,
    Failure.INTERNAL: 500,
    Failure.BAD_REPLY: 502,
}
_INVALID_INPUT: Final = (Failure.MALFORMED, Failure.INVALID, Failure.EMPTY)
# Names of the wire contract's request fields, in its order: the native shape's own.
NATIVE_FIELDS: Final = tuple(RerankRequest.model_fields)


@dataclass(frozen=True)
class RerankCall:
    """One rerank call, whatever API it came in through."""

    query: str
    documents: list[str]
    # the request's other fields for the worker (the SDK's RerankOptions); one left out
    # takes the contract's default
    options: RerankOptions = field(default_factory=RerankOptions)
    # the gateway's own: it has the documents, the worker is not asked for them back
    return_documents: bool = False
    # what to echo back as each result's document (Cohere v1 returns objects as sent)
    originals: Sequence[Any] | None = None


class Shape:
    """One API: parse its request, render its answer and its errors."""

    name: ClassVar[str]  # the `api` label of the gateway's metrics

    def parse(self, body: Any) -> RerankCall:
        """The call ``body`` asks for; :class:`BadRequest` when it does not fit."""
        raise NotImplementedError

    def render(self, call: RerankCall, result: RerankResult) -> Any:
        """The API's answer (JSON-ready)."""
        raise NotImplementedError

    def error(self, failure: Failure, message: str) -> Any:
        """The API's error body (None: an empty body)."""
        raise NotImplementedError

    def status(self, failure: Failure) -> int:
        """The HTTP status of ``failure`` in this API."""
        raise NotImplementedError


class CohereV2(Shape):
    """Cohere's ``POST /v2/rerank``: ``model``, ``query``, ``documents`` (strings),
    ``top_n``; ``max_tokens_per_doc`` and ``priority`` are accepted and ignored (the
    worker truncates at the model's limit), ``relevant_spans`` only when not enabled, and
    ``return_documents`` of the v2 API's first version is still served."""

    name = "cohere_v2"
    api_version = "2"
    fields: ClassVar[Collection[str]] = (
        "model",
        "query",
        "documents",
        "top_n",
        "return_documents",
        "max_tokens_per_doc",
        "priority",
        "relevant_spans",
    )
    reference = "https://docs.cohere.com/reference/rerank"

    def parse(self, body: Any) -> RerankCall:
        fields = self._fields(body)
        _optional(fields, "max_tokens_per_doc", int)
        _optional(fields, "priority", int)
        spans = _optional(fields, "relevant_spans", dict)
        if spans is not None and spans.get("mode") == "enabled":
            raise BadRequest("`relevant_spans` is not supported by this model")
        return RerankCall(
            query=_query(fields, "query"),
            documents=_strings(fields, "documents"),
            options=_given(top_n=_top_n(fields)),
            return_documents=_optional(fields, "return_documents", bool) or False,
        )

    def render(self, call: RerankCall, result: RerankResult) -> Any:
        results = []
        for item in result.results:
            entry: dict[str, Any] = {"index": item.index, "relevance_score": item.score}
            if call.return_documents:
                entry["document"] = self._document(call, item.index)
            results.append(entry)
        return {
            "id": result.id,
            "results": results,
            "meta": {
                "api_version": {"version": self.api_version},
                "billed_units": {"search_units": 1},
            },
        }

    def error(self, failure: Failure, message: str) -> Any:
        # Cohere's error body: a message (invalid input as "invalid request: ..."), and an id.
        if failure in _INVALID_INPUT:
            message = f"invalid request: {message}"
        return {"id": str(uuid.uuid4()), "message": message}

    def status(self, failure: Failure) -> int:
        if failure is Failure.UNKNOWN_FIELD:
            return 422
        return 400 if failure in _INVALID_INPUT else _STATUS[failure]

    def _fields(self, body: Any) -> Mapping[str, Any]:
        fields = _object(body)
        unknown = [name for name in fields if name not in self.fields]
        if unknown:
            raise BadRequest(
                f"unknown field: parameter '{unknown[0]}' is not a valid field. "
                f"For proper usage, please refer to {self.reference}",
                Failure.UNKNOWN_FIELD,
            )
        _optional(fields, "model", str)
        return fields

    def _document(self, call: RerankCall, index: int) -> Any:
        return {"text": call.documents[index]}


class CohereV1(CohereV2):
    """Cohere's ``POST /v1/rerank``: documents are strings or objects with ``text``
    (or the fields named in ``rank_fields``); objects come back as sent;
    ``max_chunks_per_doc`` is accepted and ignored."""

    name = "cohere_v1"
    api_version = "1"
    fields = (
        "model",
        "query",
        "documents",
        "top_n",
        "rank_fields",
        "return_documents",
        "max_chunks_per_doc",
    )
    reference = "https://docs.cohere.com/v1/reference/rerank"

    def parse(self, body: Any) -> RerankCall:
        fields = self._fields(body)
        _optional(fields, "max_chunks_per_doc", int)
        rank_fields = _optional(fields, "rank_fields", list)
        if rank_fields is not None and not all(isinstance(f, str) for f in rank_fields):
            raise BadRequest("`rank_fields` must be a list of strings")
        originals = _list(fields, "documents")
        documents = [_v1_text(doc, i, rank_fields) for i, doc in enumerate(originals)]
        return RerankCall(
            query=_query(fields, "query"),
            documents=documents,
            options=_given(top_n=_top_n(fields)),
            return_documents=_optional(fields, "return_documents", bool) or False,
            originals=originals,
        )

    def _document(self, call: RerankCall, index: int) -> Any:
        assert call.originals is not None
        original = call.originals[index]
        return original if isinstance(original, Mapping) else {"text": original}


class Tei(Shape):
    """text-embeddings-inference's ``POST /rerank``: ``query``, ``texts``,
    ``raw_scores``, ``return_text``, ``truncate`` (unset: truncated, TEI's
    ``--auto-truncate`` default since v1.9), ``truncation_direction`` (``Right`` only);
    answers a list of ``{index, score, text?}``, and errors as
    ``{"error", "error_type"}`` with TEI's statuses."""

    name = "tei"
    # Failure -> (status, TEI's ErrorType); TEI's router maps each ErrorType to one status.
    _ERRORS: ClassVar[dict[Failure, tuple[int, str]]] = {
        Failure.MALFORMED: (400, "Validation"),  # its HTTP layer's status for a syntax error
        Failure.INVALID: (422, "Validation"),
        Failure.UNKNOWN_FIELD: (422, "Validation"),  # never raised: TEI ignores them
        Failure.EMPTY: (400, "Empty"),
        Failure.BODY_TOO_LARGE: (413, "Validation"),  # its HTTP layer's body limit
        Failure.TOO_LARGE: (422, "Validation"),  # too many texts: a validation error
        Failure.SLOW_BODY: (408, "Validation"),  # its HTTP layer's request timeout
        Failure.OVERLOADED: (429, "Overloaded"),
        # the service could not score in time: TEI's answer for a full queue
        Failure.DEADLINE: (429, "Overloaded"),
        Failure.UNAVAILABLE: (503, "Unhealthy"),
        Failure.INTERNAL: (424, "Backend"),
        Failure.BAD_REPLY: (424, "Backend"),
        Failure.UNAUTHORIZED: (401, ""),  # TEI answers 401 with an empty body
    }
    _DOCUMENTS_WORD: ClassVar = re.compile(r"\bdocuments\b")
    _SYNTAX: ClassVar = "Failed to parse the request body as JSON: "
    _DATA: ClassVar = "Failed to deserialize the JSON body into the target type: "

    def parse(self, body: Any) -> RerankCall:
        try:
            fields = _object(body)
            query = _required(fields, "query", str)
            texts = _required(fields, "texts", list)
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise BadRequest(f"`texts[{i}]` must be a string, not {_json_type(text)}")
            truncate = _optional(fields, "truncate", bool)
            raw_scores = _not_null(fields, "raw_scores", bool, False)
            return_text = _not_null(fields, "return_text", bool, False)
            direction = _not_null(fields, "truncation_direction", str, "Right")
            if direction not in ("Right", "right", "Left", "left"):
                raise BadRequest(
                    f"`truncation_direction`: unknown variant `{direction}`, expected `Left` "
                    "or `Right`"
                )
        except BadRequest as error:
            raise BadRequest(self._DATA + str(error)) from None
        if not texts:
            raise BadRequest("`texts` cannot be empty", Failure.EMPTY)
        if direction.lower() == "left":
            raise BadRequest("`truncation_direction` `Left` is not supported; use `Right`")
        if not query.strip():
            raise BadRequest("`query` must not be empty")
        return RerankCall(
            query=query,
            documents=texts,
            options=_given(raw_scores=raw_scores, truncate=truncate),
            return_documents=return_text,
        )

    def render(self, call: RerankCall, result: RerankResult) -> Any:
        answer = []
        for item in result.results:
            entry: dict[str, Any] = {"index": item.index, "score": item.score}
            if call.return_documents:
                entry["text"] = call.documents[item.index]
            answer.append(entry)
        return answer

    def error(self, failure: Failure, message: str) -> Any:
        _, error_type = self._ERRORS[failure]
        if not error_type:
            return None
        if failure is Failure.MALFORMED:
            message = self._SYNTAX + message
        # the worker's messages name the contract's `documents`: TEI's callers sent `texts`
        return {"error": self._DOCUMENTS_WORD.sub("texts", message), "error_type": error_type}

    def status(self, failure: Failure) -> int:
        return self._ERRORS[failure][0]


class Native(Shape):
    """The wire contract over HTTP: the request body of ``rerank.requests`` (``query``,
    ``documents``, ``instruction``, ``top_n``, ``return_documents``, ``raw_scores``,
    ``truncate``; ``id`` is accepted, the gateway choosing the correlation id) and the reply
    body of ``rerank.replies``. Unknown fields are refused, as over Kafka."""

    name = "native"

    def parse(self, body: Any) -> RerankCall:
        fields = _object(body)
        unknown = [name for name in fields if name not in NATIVE_FIELDS]
        if unknown:
            allowed = ", ".join(NATIVE_FIELDS)
            raise BadRequest(
                "; ".join(f"{name}: unknown field (allowed: {allowed})" for name in unknown),
                Failure.UNKNOWN_FIELD,
            )
        _optional(fields, "id", str)
        # every request field but the documents' return is the worker's: checked as the
        # SDK checks it, so a new field of the contract needs nothing here
        options = {
            name: fields[name]
            for name in OPTION_NAMES
            if name != "return_documents" and fields.get(name) is not None
        }
        try:
            check_options(options)  # type: ignore[arg-type]
        except InvalidArgument as error:
            name, _, rest = str(error).partition(" ")
            raise BadRequest(f"`{name}` {rest}") from None
        return RerankCall(
            query=_query(fields, "query"),
            documents=_strings(fields, "documents"),
            options=options,  # type: ignore[arg-type]  # checked just above
            return_documents=_optional(fields, "return_documents", bool) or False,
        )

    def render(self, call: RerankCall, result: RerankResult) -> Any:
        if call.return_documents:
            result = result.with_documents(call.documents)
        answer = result.to_dict()
        answer["model"] = model_name(result.model)
        return answer

    def error(self, failure: Failure, message: str) -> Any:
        codes = {
            Failure.MALFORMED: "invalid_request",
            Failure.EMPTY: "invalid_request",
            Failure.UNKNOWN_FIELD: "invalid_request",
            Failure.BODY_TOO_LARGE: "payload_too_large",
        }
        code = codes.get(failure, failure.value)
        retriable = failure in (Failure.OVERLOADED, Failure.UNAVAILABLE, Failure.DEADLINE)
        return {"error": {"code": code, "message": message, "retriable": retriable}}

    def status(self, failure: Failure) -> int:
        if failure in (*_INVALID_INPUT, Failure.UNKNOWN_FIELD):
            return 422
        return _STATUS[failure]


def shape_of_root_rerank(body: Any) -> Shape:
    """``POST /rerank`` serves two APIs: the native one for a body with ``documents`` and no
    ``texts``, TEI's (the API that owns the path) for anything else, so that a body that is
    not JSON, or that lacks ``texts``, gets TEI's answer."""
    if isinstance(body, Mapping) and "documents" in body and "texts" not in body:
        return NATIVE
    return TEI


def model_name(model: str) -> str:
    """A model's name for callers: a worker that reports a folder (older workers did) is
    shown as the folder's last part, never as a path; a hub id stays as it is."""
    if model.startswith(("/", "~", "./", "../")) or re.match(r"[A-Za-z]:[\\/]", model):
        return PurePath(model).name or model
    return model


COHERE_V2 = CohereV2()
COHERE_V1 = CohereV1()
TEI = Tei()
NATIVE = Native()


# -- field readers -------------------------------------------------------------------


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise BadRequest(f"the body must be a JSON object, not {_json_type(body)}")
    return body


def _optional(fields: Mapping[str, Any], name: str, kind: type) -> Any:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"`{name}` must be {_kind_name(kind)}, not {_json_type(value)}")
    return value


def _required(fields: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in fields:
        raise BadRequest(f"missing field `{name}`")
    value = fields[name]
    if not isinstance(value, kind):
        raise BadRequest(f"`{name}` must be {_kind_name(kind)}, not {_json_type(value)}")
    return value


def _not_null(fields: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    """A field that may be left out but not be null (TEI's non-optional fields)."""
    if name not in fields:
        return default
    return _required(fields, name, kind)


def _query(fields: Mapping[str, Any], name: str) -> str:
    query = _optional(fields, name, str)
    if not query or not query.strip():
        raise BadRequest(f"`{name}` is required and must not be empty or be only whitespace")
    return str(query)


def _list(fields: Mapping[str, Any], name: str) -> list[Any]:
    value = _optional(fields, name, list)
    if value is None:
        raise BadRequest(f"`{name}` is required and must be a non-empty list")
    if not value:
        raise BadRequest(f"list of `{name}` must not be empty", Failure.EMPTY)
    return list(value)


def _strings(fields: Mapping[str, Any], name: str) -> list[str]:
    values = _list(fields, name)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise BadRequest(f"`{name}[{i}]` must be a string, not {_json_type(value)}")
    return values


def _given(**options: Any) -> RerankOptions:
    """The options an API gave (those left out, None, take the contract's defaults)."""
    return RerankOptions(**{name: value for name, value in options.items() if value is not None})  # type: ignore[typeddict-item]


def _top_n(fields: Mapping[str, Any]) -> int | None:
    top_n = _optional(fields, "top_n", int)
    if top_n is not None and top_n < 1:
        raise BadRequest(f"`top_n` must be at least 1, not {top_n}")
    return top_n


def _v1_text(document: Any, index: int, rank_fields: list[str] | None) -> str:
    if isinstance(document, str):
        return document
    if not isinstance(document, Mapping):
        raise BadRequest(f"`documents[{index}]` must be a string or an object with `text`")
    if rank_fields:
        # Cohere ranks objects on the named fields, in order, as "key: value" lines.
        lines = [f"{key}: {document[key]}" for key in rank_fields if key in document]
        if not lines:
            raise BadRequest(f"`documents[{index}]` has none of the rank_fields {rank_fields}")
        return "\n".join(lines)
    text = document.get("text")
    if not isinstance(text, str):
        raise BadRequest(f"`documents[{index}].text` is required and must be a string")
    return text


def _kind_name(kind: type) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", list: "a list"}
    names |= {dict: "an object"}
    return names.get(kind, kind.__name__)


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number"}
    names |= {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
