"""Wire contract, version 1: the pydantic models of request and reply records.

These models are the single source of truth of the contract: the JSON Schema files
next to this module are generated from them (``python -m schemas.generate``) and a
unit test fails when models and files drift apart.

Every model is strict (``"5"`` is not an integer, ``true`` is not an integer, ``1`` is
not a boolean) and forbids unknown fields, so a typo such as ``"topn"`` is an error
instead of a silently ignored option. One divergence from JSON Schema is known and
deliberate: JSON Schema counts ``5.0`` as an integer, these models do not; producers
should send integers as integers.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

CONTRACT_VERSION: Final = 1

# Headers of a request record (and of the reply: ``correlation-id``).
HEADER_CORRELATION_ID: Final = "correlation-id"
HEADER_REPLY_TOPIC: Final = "reply-topic"
HEADER_REPLY_PARTITION: Final = "reply-partition"
HEADER_DEADLINE_MS: Final = "deadline-ms"

# Headers added to a record copied to the dead-letter topic.
DLQ_HEADER_ERROR_CODE: Final = "error-code"
DLQ_HEADER_ERROR_MESSAGE: Final = "error-message"
DLQ_HEADER_SOURCE_TOPIC: Final = "source-topic"
DLQ_HEADER_SOURCE_PARTITION: Final = "source-partition"
DLQ_HEADER_SOURCE_OFFSET: Final = "source-offset"
# Only on a dead-letter record that could not hold the original whole: the original's
# size in bytes (key, value and headers); its value is left out (and, if need be, its key
# and headers): read it at source-topic / source-partition / source-offset.
DLQ_HEADER_SOURCE_SIZE: Final = "source-size"
DLQ_HEADERS: Final = (
    DLQ_HEADER_ERROR_CODE,
    DLQ_HEADER_ERROR_MESSAGE,
    DLQ_HEADER_SOURCE_TOPIC,
    DLQ_HEADER_SOURCE_PARTITION,
    DLQ_HEADER_SOURCE_OFFSET,
    DLQ_HEADER_SOURCE_SIZE,
)

MAX_ID_CHARS: Final = 256
# "Contains a character that is not whitespace"; searched, not anchored, both by
# pydantic (python-re engine, see _STRICT) and by JSON Schema validators.
NOT_BLANK_PATTERN: Final = r"\S"

_STRICT = ConfigDict(
    strict=True,
    extra="forbid",
    allow_inf_nan=False,
    # The same regex semantics as Python JSON Schema validators (search, Unicode \s).
    regex_engine="python-re",
)


def _drop_default(schema: dict[str, Any]) -> None:
    """Remove ``"default": null`` of a field that is omitted rather than null."""
    schema.pop("default", None)


CorrelationId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


class ErrorCode(StrEnum):
    """Why a request got an error reply (or a dead-letter record)."""

    INVALID_REQUEST = "invalid_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class RerankRequest(BaseModel):
    """The value of a record on the request topic."""

    model_config = ConfigDict(
        **_STRICT,
        title="RerankRequest",
        json_schema_extra={
            "description": (
                "Rerank request, wire contract version 1. The correlation id comes from "
                "the 'correlation-id' record header, else from 'id'; when both are "
                "present the header wins."
            )
        },
    )

    id: CorrelationId | None = Field(
        default=None,
        description="Correlation id; used when the record has no 'correlation-id' header.",
    )
    query: str = Field(
        pattern=NOT_BLANK_PATTERN,
        description="The search query; must contain a non-whitespace character.",
    )
    documents: list[str] = Field(
        min_length=1, description="Candidate documents; results index into this list."
    )
    instruction: str | None = Field(
        default=None,
        description="Task instruction for the model; the model's default when absent.",
    )
    top_n: int | None = Field(
        default=None,
        ge=1,
        description="Return only the best top_n results; all results when absent.",
    )
    return_documents: bool = Field(
        default=False, description="Include each result's document text."
    )
    raw_scores: bool = Field(
        default=False,
        description="Report raw model logits instead of calibrated [0, 1] scores.",
    )
    truncate: bool = Field(
        default=True,
        description=(
            "Cut documents that do not fit the model's token limit and score the rest "
            "(the reply's 'truncated' lists them). When false, such a request gets an "
            "invalid_request error naming the documents and the limit instead."
        ),
    )
    split_long_documents: bool | None = Field(
        default=None,
        description=(
            "Score a document that does not fit the model's token limit as overlapping "
            "windows that do, the document taking its best window's score (its result's "
            "'window' says which), instead of cutting it. Absent or null: the worker's "
            "default (RERANK_SPLIT_LONG_DOCUMENTS, off unless set). A document needing "
            "more windows than the worker allows (RERANK_MAX_WINDOWS_PER_DOCUMENT) is "
            "still cut after them, which 'truncate' governs as usual."
        ),
    )


class DocumentWindow(BaseModel):
    """Which window of a document split into windows gave the document its score."""

    model_config = _STRICT

    index: int = Field(ge=0, description="The window's position among the document's, from 0.")
    count: int = Field(ge=2, description="Windows the document was split into.")
    start: int = Field(ge=0, description="First character of the document in the window.")
    end: int = Field(ge=0, description="One past the window's last character.")


class RerankResult(BaseModel):
    """One scored document of a reply."""

    model_config = _STRICT

    index: int = Field(ge=0, description="Position of the document in the request.")
    relevance_score: float = Field(
        description="Calibrated score in [0, 1], or the raw logit when raw_scores was set."
    )
    document: str | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_drop_default,
        description="The document text; present only when return_documents was set.",
    )
    window: DocumentWindow | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_drop_default,
        description=(
            "The window whose score the document got; present only when the document was "
            "split into windows (split_long_documents)."
        ),
    )

    @field_validator("document", "window", mode="before")
    @classmethod
    def _absent_not_null(cls, value: object) -> object:
        # The field is omitted when there is no document, never null (as the schema says);
        # defaults are not validated, so only an explicit null reaches this check.
        if value is None:
            raise ValueError("must be omitted rather than null")
        return value


class Usage(BaseModel):
    """Token usage of one request."""

    model_config = _STRICT

    prompt_tokens: int = Field(ge=0, description="Prompt tokens scored for this request.")


class Timing(BaseModel):
    """Where the time of one request went, in milliseconds."""

    model_config = _STRICT

    queue: float = Field(ge=0, description="Waiting for the model (ms).")
    inference: float = Field(ge=0, description="Model forward passes (ms).")
    total: float = Field(ge=0, description="Record received to reply produced (ms).")


class RerankReply(BaseModel):
    """A successful reply: results sorted by relevance_score, best first."""

    model_config = _STRICT

    id: CorrelationId
    model: str = Field(description="The model that produced the scores.")
    results: list[RerankResult]
    truncated: list[Annotated[int, Field(ge=0)]] | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_drop_default,
        description=(
            "Indices (into the request's documents, ascending) of the documents that were "
            "cut to fit the model's token limit before scoring, whether or not they are "
            "among the results. Present only when at least one was."
        ),
    )
    usage: Usage
    timing_ms: Timing

    @field_validator("truncated", mode="before")
    @classmethod
    def _absent_not_null(cls, value: object) -> object:
        # Omitted when nothing was truncated, never null (as the schema says).
        if value is None:
            raise ValueError("must be omitted rather than null")
        return value


class ErrorBody(BaseModel):
    """What went wrong, and whether sending the same request again may succeed."""

    model_config = _STRICT

    code: ErrorCode
    message: str
    retriable: bool


class ErrorReply(BaseModel):
    """An error reply to a request whose correlation id is known."""

    model_config = _STRICT

    id: CorrelationId
    error: ErrorBody
