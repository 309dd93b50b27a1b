"""The HTTP rerank APIs the gateway speaks: how each one's request reads and its answer looks.

Each shape turns a JSON body into one :class:`RerankCall` and a result back into the
JSON its callers expect, and says how it reports an error (status code for invalid
input, error body). The shapes know nothing about HTTP serving or Kafka.

- :class:`CohereV2`: ``POST /v2/rerank`` (Cohere's v2 API; the ``cohere`` SDK's
  ``ClientV2.rerank``).
- :class:`CohereV1`: ``POST /v1/rerank`` (documents may be objects; ``rank_fields``).
- :class:`Tei`: ``POST /rerank`` with ``texts`` (Hugging Face text-embeddings-inference).
- :class:`Native`: ``POST /rerank`` with ``documents``: the wire contract's request body
  and reply, ``instruction`` included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from producer_sdk.result import RerankResult


class BadRequest(ValueError):
    """The body does not follow the API's request shape."""


class Failure(Enum):
    """What went wrong, independent of the API; each shape has its status and body."""

    INVALID = "invalid_request"
    TOO_LARGE = "payload_too_large"
    UNAUTHORIZED = "unauthorized"
    OVERLOADED = "overloaded"
    DEADLINE = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    BAD_REPLY = "bad_reply"


# Statuses every shape shares; only invalid input differs (400 or 422 as each API does).
STATUS = {
    Failure.TOO_LARGE: 413,
    Failure.UNAUTHORIZED: 401,
    Failure.OVERLOADED: 429,
    Failure.DEADLINE: 504,
    Failure.UNAVAILABLE: 503,
    Failure.INTERNAL: 500,
    Failure.BAD_REPLY: 502,
}


@dataclass(frozen=True)
class RerankCall:
    """One rerank call, whatever API it came in through."""

    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = False
    instruction: str | None = None
    raw_scores: bool = False
    truncate: bool | None = None  # None: the service's default
    split_long_documents: bool | None = None  # None: the service's default
    # what to echo back as each result's document (Cohere v1 returns objects as sent)
    originals: Sequence[Any] | None = None


class Shape:
    """One API: parse its request, render its answer and its errors."""

    name: ClassVar[str]  # the `api` label of the gateway's metrics
    invalid_status: ClassVar[int]

    def parse(self, body: Any) -> RerankCall:
        """The call ``body`` asks for; :class:`BadRequest` when it does not fit."""
        raise NotImplementedError

    def render(self, call: RerankCall, result: RerankResult) -> Any:
        """The API's answer (JSON-ready)."""
        raise NotImplementedError

    def error(self, failure: Failure, message: str) -> Any:
        """The API's error body."""
        return {"message": message}

    def status(self, failure: Failure) -> int:
        """The HTTP status of ``failure`` in this API."""
        return self.invalid_status if failure is Failure.INVALID else STATUS[failure]


class CohereV2(Shape):
    """Cohere's ``POST /v2/rerank``: ``model``, ``query``, ``documents`` (strings),
    ``top_n``, ``return_documents``; ``max_tokens_per_doc`` and ``priority`` are
    accepted and ignored (the worker truncates at the model's limit)."""

    name = "cohere_v2"
    invalid_status = 400
    api_version = "2"

    def parse(self, body: Any) -> RerankCall:
        fields = _object(body)
        _optional(fields, "model", str)
        return RerankCall(
            query=_query(fields, "query"),
            documents=_strings(fields, "documents"),
            top_n=_top_n(fields),
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

    def _document(self, call: RerankCall, index: int) -> Any:
        return {"text": call.documents[index]}


class CohereV1(CohereV2):
    """Cohere's ``POST /v1/rerank``: documents are strings or objects with ``text``
    (or the fields named in ``rank_fields``); objects come back as sent."""

    name = "cohere_v1"
    api_version = "1"

    def parse(self, body: Any) -> RerankCall:
        fields = _object(body)
        _optional(fields, "model", str)
        rank_fields = _optional(fields, "rank_fields", list)
        if rank_fields is not None and not all(isinstance(f, str) for f in rank_fields):
            raise BadRequest("`rank_fields` must be a list of strings")
        originals = _list(fields, "documents")
        documents = [_v1_text(doc, i, rank_fields) for i, doc in enumerate(originals)]
        return RerankCall(
            query=_query(fields, "query"),
            documents=documents,
            top_n=_top_n(fields),
            return_documents=_optional(fields, "return_documents", bool) or False,
            originals=originals,
        )

    def _document(self, call: RerankCall, index: int) -> Any:
        assert call.originals is not None
        original = call.originals[index]
        return original if isinstance(original, Mapping) else {"text": original}


class Tei(Shape):
    """text-embeddings-inference's ``POST /rerank``: ``query``, ``texts``,
    ``raw_scores``, ``return_text``, ``truncate`` (TEI's default: false, so a text
    over the model's limit is an error, 413); answers a list of ``{index, score, text?}``."""

    name = "tei"
    invalid_status = 422

    def parse(self, body: Any) -> RerankCall:
        fields = _object(body)
        direction = _optional(fields, "truncation_direction", str)
        if direction is not None and direction.lower() != "right":
            raise BadRequest("only truncation_direction 'Right' is supported")
        return RerankCall(
            query=_query(fields, "query"),
            documents=_strings(fields, "texts"),
            raw_scores=_optional(fields, "raw_scores", bool) or False,
            return_documents=_optional(fields, "return_text", bool) or False,
            truncate=_optional(fields, "truncate", bool) or False,
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
        kinds = {Failure.INVALID: "validation", Failure.TOO_LARGE: "validation"}
        return {"error": message, "error_type": kinds.get(failure, failure.value)}


class Native(Shape):
    """The wire contract over HTTP: the request body of ``rerank.requests`` (``query``,
    ``documents``, ``instruction``, ``top_n``, ``return_documents``, ``raw_scores``,
    ``truncate``) and the reply body of ``rerank.replies``."""

    name = "native"
    invalid_status = 422

    def parse(self, body: Any) -> RerankCall:
        fields = _object(body)
        return RerankCall(
            query=_query(fields, "query"),
            documents=_strings(fields, "documents"),
            top_n=_top_n(fields),
            return_documents=_optional(fields, "return_documents", bool) or False,
            instruction=_optional(fields, "instruction", str),
            raw_scores=_optional(fields, "raw_scores", bool) or False,
            truncate=_optional(fields, "truncate", bool),
            split_long_documents=_optional(fields, "split_long_documents", bool),
        )

    def render(self, call: RerankCall, result: RerankResult) -> Any:
        if call.return_documents:
            result = result.with_documents(call.documents)
        return result.to_dict()

    def error(self, failure: Failure, message: str) -> Any:
        retriable = failure in (Failure.OVERLOADED, Failure.UNAVAILABLE, Failure.DEADLINE)
        return {"error": {"code": failure.value, "message": message, "retriable": retriable}}


def shape_of_root_rerank(body: Any) -> Shape:
    """``POST /rerank`` serves two APIs: TEI's sends ``texts``, the native one ``documents``."""
    if isinstance(body, Mapping) and "texts" in body and "documents" not in body:
        return TEI
    return NATIVE


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


def _query(fields: Mapping[str, Any], name: str) -> str:
    query = _optional(fields, name, str)
    if not query:
        raise BadRequest(f"`{name}` is required and must be a non-empty string")
    return str(query)


def _list(fields: Mapping[str, Any], name: str) -> list[Any]:
    value = _optional(fields, name, list)
    if not value:
        raise BadRequest(f"`{name}` is required and must be a non-empty list")
    return list(value)


def _strings(fields: Mapping[str, Any], name: str) -> list[str]:
    values = _list(fields, name)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise BadRequest(f"`{name}[{i}]` must be a string, not {_json_type(value)}")
    return values


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
    return names.get(kind, kind.__name__)


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number"}
    names |= {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
