"""Spring Kafka's and CloudEvents' header conventions: reading a request's headers, the
reply headers each caller waits for, and the codec's choices when conventions mix."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from consumer.service.codec import (
    DecodedRequest,
    Rejection,
    ReplyRoute,
    RequestLimits,
    decode_request,
    reply_address,
    reply_headers,
)
from consumer.service.conventions import (
    CE_SOURCE_SERVICE,
    CE_TYPE_ERROR,
    CE_TYPE_RESULT,
    MAX_SPRING_ID_BYTES,
    NATIVE,
    Convention,
    read_inbound,
    reply_extra_headers,
)
from schemas import ErrorCode

LIMITS = RequestLimits()
SPRING_ID = uuid.UUID("0b3d1c2e-4f5a-4b6c-8d7e-9f0a1b2c3d4e").bytes  # what Spring sends
BODY = orjson.dumps({"query": "what is kafka", "documents": ["a log", "a novelist"]})


def spring_headers(
    correlation: bytes = SPRING_ID, topic: bytes | None = b"rerank.replies.spring", **extra: Any
) -> list[tuple[str, bytes | None]]:
    headers: list[tuple[str, bytes | None]] = [("kafka_correlationId", correlation)]
    if topic is not None:
        headers.append(("kafka_replyTopic", topic))
    headers += list(extra.items())
    return headers


def ce_headers(**overrides: bytes | None) -> list[tuple[str, bytes | None]]:
    attributes: dict[str, bytes | None] = {
        "ce_specversion": b"1.0",
        "ce_id": b"event-1",
        "ce_source": b"/search/frontend",
        "ce_type": b"com.example.rerank.request",
        "content-type": b"application/json",
    }
    attributes.update(overrides)
    return [(name, value) for name, value in attributes.items() if value is not None]


def decoded(headers: Any, value: bytes = BODY) -> DecodedRequest:
    result = decode_request(value, headers, LIMITS)
    assert isinstance(result, DecodedRequest), result
    return result


def rejected(headers: Any, value: bytes = BODY) -> Rejection:
    result = decode_request(value, headers, LIMITS)
    assert isinstance(result, Rejection), result
    return result


# ------------------------------------------------------------------------ Spring Kafka


def test_spring_defaults_decode_with_a_hex_correlation_id_and_spring_reply_topic() -> None:
    request = decoded(spring_headers())
    assert request.correlation_id == SPRING_ID.hex()
    assert request.route == ReplyRoute("rerank.replies.spring", None)
    assert request.convention == Convention(spring_correlation=SPRING_ID)


def test_the_spring_reply_echoes_the_raw_correlation_bytes_unchanged() -> None:
    request = decoded(spring_headers())
    headers = reply_headers(request.correlation_id, request.convention)
    assert headers == [
        ("correlation-id", SPRING_ID.hex().encode()),
        ("kafka_correlationId", SPRING_ID),
    ]


def test_any_bytes_are_a_spring_correlation_id_even_invalid_utf8() -> None:
    raw = b"\xff\xfe\x00\x80"
    request = decoded(spring_headers(correlation=raw))
    assert request.correlation_id == "fffe0080"
    assert dict(reply_headers(request.correlation_id, request.convention))[
        "kafka_correlationId"
    ] == (raw)


def test_spring_reply_partition_is_a_four_byte_big_endian_int() -> None:
    request = decoded(spring_headers(kafka_replyPartition=(7).to_bytes(4, "big")))
    assert request.route == ReplyRoute("rerank.replies.spring", 7)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x07", "must be a 4-byte big-endian integer, got 2 bytes"),
        ((-1).to_bytes(4, "big", signed=True), "must be >= 0, got -1"),
    ],
)
def test_a_bad_spring_reply_partition_is_answered_invalid_request(raw: bytes, message: str) -> None:
    rejection = rejected(spring_headers(kafka_replyPartition=raw))
    assert rejection.code is ErrorCode.INVALID_REQUEST
    assert "kafka_replyPartition" in rejection.message and message in rejection.message
    # still answered where Spring listens, with its correlation echoed
    assert rejection.correlation_id == SPRING_ID.hex()
    assert rejection.route == ReplyRoute("rerank.replies.spring", None)
    assert rejection.convention.spring_correlation == SPRING_ID


def test_a_bad_spring_reply_topic_is_answered_on_the_default_topic() -> None:
    rejection = rejected(spring_headers(topic=b"no spaces allowed"))
    assert "kafka_replyTopic" in rejection.message
    assert rejection.route == ReplyRoute(None, None)


@pytest.mark.parametrize("raw", [b"", b"x" * (MAX_SPRING_ID_BYTES + 1)])
def test_an_empty_or_huge_spring_correlation_id_is_unusable(raw: bytes) -> None:
    rejection = rejected(spring_headers(correlation=raw))
    assert "kafka_correlationId" in rejection.message
    assert rejection.correlation_id is None  # nobody to answer: dead-lettered


def test_our_own_headers_win_over_springs() -> None:
    headers = [
        ("correlation-id", b"ours"),
        ("reply-topic", b"rerank.replies.ours"),
        ("reply-partition", b"2"),
        *spring_headers(kafka_replyPartition=(5).to_bytes(4, "big")),
    ]
    request = decoded(headers)
    assert request.correlation_id == "ours"
    assert request.route == ReplyRoute("rerank.replies.ours", 2)
    # Spring's id is still echoed: the template matches its replies on it
    assert reply_headers(request.correlation_id, request.convention) == [
        ("correlation-id", b"ours"),
        ("kafka_correlationId", SPRING_ID),
    ]


def test_the_spring_id_wins_over_the_body_id() -> None:
    body = orjson.dumps({"id": "from-body", "query": "q", "documents": ["d"]})
    request = decoded(spring_headers(), body)
    assert request.correlation_id == SPRING_ID.hex()
    assert request.request.id == "from-body"


# ------------------------------------------------------------------------ CloudEvents


def test_a_binary_mode_cloudevent_decodes_with_ce_id_as_correlation_id() -> None:
    request = decoded(ce_headers())
    assert request.correlation_id == "event-1"
    assert request.convention == Convention(cloudevents=True)
    assert request.route == ReplyRoute(None, None)


@pytest.mark.parametrize(("error", "ce_type"), [(False, CE_TYPE_RESULT), (True, CE_TYPE_ERROR)])
def test_a_cloudevent_reply_is_a_binary_mode_cloudevent(error: bool, ce_type: str) -> None:
    headers = reply_headers("event-1", Convention(cloudevents=True), error=error)
    assert headers == [
        ("correlation-id", b"event-1"),
        ("ce_specversion", b"1.0"),
        ("ce_id", b"event-1"),
        ("ce_source", CE_SOURCE_SERVICE.encode()),
        ("ce_type", ce_type.encode()),
        ("content-type", b"application/json"),
    ]


def test_any_other_correlation_id_wins_over_ce_id() -> None:
    body = orjson.dumps({"id": "from-body", "query": "q", "documents": ["d"]})
    assert decoded(ce_headers(), body).correlation_id == "from-body"
    assert decoded([("correlation-id", b"ours"), *ce_headers()]).correlation_id == "ours"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ce_specversion": b"0.3"}, "header 'ce_specversion' must be '1.0', got '0.3'"),
        ({"ce_source": None}, "header 'ce_source' is required in a CloudEvent"),
        ({"ce_type": b""}, "header 'ce_type' is required in a CloudEvent"),
        ({"ce_type": b"\xff"}, "header 'ce_type' is not valid UTF-8"),
    ],
)
def test_a_broken_cloudevent_gets_an_error_cloudevent(
    overrides: dict[str, bytes | None], message: str
) -> None:
    rejection = rejected(ce_headers(**overrides))
    assert rejection.code is ErrorCode.INVALID_REQUEST
    assert message in rejection.message
    assert rejection.correlation_id == "event-1"
    assert rejection.convention.cloudevents


def test_a_cloudevent_without_an_id_and_no_other_id_is_dead_lettered() -> None:
    rejection = rejected(ce_headers(ce_id=None))
    assert "ce_id" in rejection.message
    assert rejection.correlation_id is None


def test_a_structured_mode_cloudevent_is_refused_clearly() -> None:
    envelope = orjson.dumps({"specversion": "1.0", "id": "e", "data": {"query": "q"}})
    headers = [("correlation-id", b"c-1"), ("content-type", b"application/cloudevents+json")]
    rejection = rejected(headers, envelope)
    assert "structured-mode CloudEvents are not supported" in rejection.message


def test_spring_and_cloudevents_together_get_both() -> None:
    request = decoded(spring_headers() + ce_headers())
    assert request.correlation_id == SPRING_ID.hex()
    names = [name for name, _ in reply_headers(request.correlation_id, request.convention)]
    assert names == [
        "correlation-id",
        "kafka_correlationId",
        "ce_specversion",
        "ce_id",
        "ce_source",
        "ce_type",
        "content-type",
    ]


# ------------------------------------------------------------------------ our own


def test_a_request_in_our_convention_has_no_extra_reply_headers() -> None:
    request = decoded([("correlation-id", b"c-1"), ("content-type", b"application/json")])
    assert request.convention == NATIVE
    assert reply_extra_headers(request.convention, "c-1", error=True) == []
    assert read_inbound({}) == read_inbound({"unrelated": b"x"})


def test_the_poison_path_reads_the_callers_convention_from_headers_alone() -> None:
    correlation_id, route, convention = reply_address(
        spring_headers(kafka_replyPartition=(1).to_bytes(4, "big"))
    )
    assert correlation_id == SPRING_ID.hex()
    assert route == ReplyRoute("rerank.replies.spring", 1)
    assert convention.spring_correlation == SPRING_ID
    assert reply_address(ce_headers())[0] == "event-1"
