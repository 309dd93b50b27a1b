"""Request decoding and reply encoding follow every rule of wire contract v1."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from consumer.engine.api import ScoreResult
from consumer.service.codec import (
    DecodedRequest,
    Rejection,
    ReplyRoute,
    RequestLimits,
    decode_request,
    dlq_headers,
    encode_error,
    encode_rejection,
    encode_result,
    encode_success,
    reply_headers,
)
from schemas import ErrorCode, ErrorReply, RerankReply, generate

LIMITS = RequestLimits()
REPLY_VALIDATOR = Draft202012Validator(
    json.loads((Path(generate.__file__).parent / generate.REPLY_FILE).read_text("utf-8"))
)


def body(**fields: Any) -> bytes:
    payload: dict[str, Any] = {"query": "what is kafka", "documents": ["a log", "a queue"]}
    payload.update(fields)
    return orjson.dumps(payload)


def cid(value: bytes = b"c-1") -> list[tuple[str, bytes]]:
    return [("correlation-id", value)]


def decoded(value: bytes | None, headers: Any, limits: RequestLimits = LIMITS) -> DecodedRequest:
    result = decode_request(value, headers, limits)
    assert isinstance(result, DecodedRequest), result
    return result


def rejected(value: bytes | None, headers: Any, limits: RequestLimits = LIMITS) -> Rejection:
    result = decode_request(value, headers, limits)
    assert isinstance(result, Rejection), result
    assert result.retriable is False
    return result


# ------------------------------------------------------------------ decode: success


def test_valid_request_with_all_headers() -> None:
    headers = [
        ("correlation-id", b"c-1"),
        ("reply-topic", b"rerank.replies.team-a"),
        ("reply-partition", b"3"),
        ("deadline-ms", b"1700000000123"),
    ]
    value = body(instruction="find it", top_n=1, return_documents=True, raw_scores=True)
    result = decoded(value, headers)
    assert result.correlation_id == "c-1"
    assert result.route == ReplyRoute("rerank.replies.team-a", 3)
    assert result.deadline == pytest.approx(1_700_000_000.123)
    req = result.request
    assert (req.query, req.documents, req.instruction) == (
        "what is kafka",
        ["a log", "a queue"],
        "find it",
    )
    assert (req.top_n, req.return_documents, req.raw_scores) == (1, True, True)


def test_defaults_without_optional_headers() -> None:
    result = decoded(body(), cid())
    assert result.route == ReplyRoute(None, None)
    assert result.deadline is None


def test_body_id_used_when_header_missing() -> None:
    assert decoded(body(id="from-body"), []).correlation_id == "from-body"


def test_header_wins_over_body_id() -> None:
    result = decoded(body(id="from-body"), cid(b"from-header"))
    assert result.correlation_id == "from-header"
    assert result.request.id == "from-body"


def test_first_header_occurrence_counts() -> None:
    headers = [("correlation-id", b"first"), ("correlation-id", b"second")]
    assert decoded(body(), headers).correlation_id == "first"


def test_header_without_value_is_absent() -> None:
    assert decoded(body(id="b"), [("correlation-id", None)]).correlation_id == "b"


def test_other_headers_are_ignored() -> None:
    headers = [*cid(), ("traceparent", b"\xff\xfe"), ("content-type", b"application/json")]
    assert decoded(body(), headers).correlation_id == "c-1"


def test_unicode_header_id() -> None:
    assert decoded(body(), cid("ключ-1".encode())).correlation_id == "ключ-1"


def test_past_deadline_is_only_parsed_here() -> None:
    assert decoded(body(), [*cid(), ("deadline-ms", b"1")]).deadline == 0.001


def test_limits_at_the_boundary_pass() -> None:
    limits = RequestLimits(
        max_documents=2, max_query_chars=13, max_document_chars=7, max_instruction_chars=3
    )
    value = body(instruction="abc")
    assert len(json.loads(value)["query"]) == 13
    decoded(value, cid(), limits)
    decoded(value, cid(), RequestLimits(max_request_bytes=len(value)))


def test_disabled_limits() -> None:
    limits = RequestLimits(max_query_chars=None, max_instruction_chars=None)
    decoded(body(query="q" * 50_000, instruction="i" * 50_000), cid(), limits)


# ------------------------------------------------------------ decode: bad bodies


def test_invalid_json_with_header_id() -> None:
    result = rejected(b'{"query": "q", "documents": [', cid())
    assert (result.correlation_id, result.code) == ("c-1", ErrorCode.INVALID_REQUEST)
    assert "not valid JSON" in result.message


def test_invalid_json_without_header_goes_nowhere() -> None:
    result = rejected(b'{"id": "x", "query": ', [])
    assert result.correlation_id is None
    assert result.code == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(
    "value", [b"\xff\xfe{}", b'{"query": "caf\xe9", "documents": ["a"]}', b"\xed\xa0\x80"]
)
def test_invalid_utf8_body(value: bytes) -> None:
    result = rejected(value, cid())
    assert (result.correlation_id, result.code) == ("c-1", ErrorCode.INVALID_REQUEST)
    assert "not valid UTF-8" in result.message


def test_tombstone() -> None:
    result = rejected(None, cid())
    assert (result.correlation_id, result.code) == ("c-1", ErrorCode.INVALID_REQUEST)
    assert "no value" in result.message


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"[]", "array"),
        (b'"q"', "string"),
        (b"null", "null"),
        (b"5", "integer"),
        (b"true", "boolean"),
    ],
)
def test_body_not_an_object(value: bytes, kind: str) -> None:
    result = rejected(value, cid())
    assert result.code == ErrorCode.INVALID_REQUEST
    assert result.message == f"request body must be a JSON object, got {kind}"


def test_empty_body() -> None:
    assert rejected(b"", cid()).code == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"query": ""}, "query: must not be empty or whitespace only"),
        ({"query": " \t\n"}, "query: must not be empty or whitespace only"),
        ({"query": 5}, "query: must be a string, got integer"),
        ({"documents": []}, "documents: list should have at least 1 item"),
        ({"documents": "abc"}, "documents: must be an array, got string"),
        ({"documents": ["a", 1]}, "documents[1]: must be a string, got integer"),
        ({"documents": [None]}, "documents[0]: must be a string, got null"),
        ({"top_n": "5"}, "top_n: must be an integer, got string"),
        ({"top_n": True}, "top_n: must be an integer, got boolean"),
        ({"top_n": 5.0}, "top_n: must be an integer, got number"),
        ({"top_n": 0}, "top_n: must be >= 1"),
        ({"return_documents": "yes"}, "return_documents: must be a boolean, got string"),
        ({"raw_scores": 1}, "raw_scores: must be a boolean, got integer"),
        ({"instruction": ["x"]}, "instruction: must be a string, got array"),
        ({"id": ""}, "id: must not be empty"),
        ({"id": "x" * 257}, "id: must have at most 256 characters"),
        ({"id": 7}, "id: must be a string, got integer"),
    ],
)
def test_wrong_fields_name_the_field(fields: dict[str, Any], message: str) -> None:
    result = rejected(body(**fields), cid())
    assert (result.correlation_id, result.code) == ("c-1", ErrorCode.INVALID_REQUEST)
    assert result.message == message


def test_missing_field() -> None:
    result = rejected(b'{"documents": ["a"]}', cid())
    assert result.message == "query: field required"


def test_unknown_field_is_named() -> None:
    result = rejected(body(topn=3), cid())
    assert result.message.startswith("topn: unknown field (allowed: id, query, documents")


def test_several_errors_are_summarised() -> None:
    result = rejected(b'{"query": "", "documents": [], "top_n": 0, "a": 1, "b": 2}', cid())
    parts = result.message.split("; ")
    assert parts[:3] == [
        "query: must not be empty or whitespace only",
        "documents: list should have at least 1 item",
        "top_n: must be >= 1",
    ]
    assert parts[3] == "2 more error(s)"


def test_messages_do_not_echo_huge_input() -> None:
    result = rejected(orjson.dumps({"query": "q", "documents": ["a"], "k" * 100_000: 1}), cid())
    assert len(result.message) < 300


def test_invalid_body_answered_with_body_id() -> None:
    result = rejected(body(id="from-body", documents=[]), [])
    assert result.correlation_id == "from-body"
    assert result.message == "documents: list should have at least 1 item"


def test_unusable_body_id_with_header() -> None:
    result = rejected(body(id=7), cid())
    assert result.correlation_id == "c-1"


def test_no_correlation_id_anywhere() -> None:
    result = rejected(body(), [])
    assert result.correlation_id is None
    assert result.code == ErrorCode.INVALID_REQUEST
    assert "correlation-id" in result.message


def test_no_correlation_id_and_invalid_body() -> None:
    result = rejected(body(documents=[]), [])
    assert result.correlation_id is None
    assert result.message == "documents: list should have at least 1 item"


# ------------------------------------------------------------------ decode: limits


def test_oversized_record() -> None:
    value = body(id="from-body")
    result = rejected(value, cid(), RequestLimits(max_request_bytes=len(value) - 1))
    assert (result.correlation_id, result.code) == ("c-1", ErrorCode.PAYLOAD_TOO_LARGE)
    assert str(len(value)) in result.message


def test_oversized_record_is_not_parsed_for_its_id() -> None:
    value = body(id="from-body")
    result = rejected(value, [], RequestLimits(max_request_bytes=len(value) - 1))
    assert result.correlation_id is None
    assert result.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_too_many_documents() -> None:
    result = rejected(body(documents=["d"] * 3), cid(), RequestLimits(max_documents=2))
    assert (result.correlation_id, result.code) == ("c-1", ErrorCode.PAYLOAD_TOO_LARGE)
    assert result.message == "documents: 3 documents; the limit is 2"


def test_default_document_limit() -> None:
    result = rejected(body(documents=["d"] * 1001), cid())
    assert result.code == ErrorCode.PAYLOAD_TOO_LARGE
    decoded(body(documents=["d"] * 1000), cid())


def test_too_long_query() -> None:
    result = rejected(body(query="q" * 10_001), cid())
    assert result.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert result.message == "query: 10001 characters; the limit is 10000"


def test_too_long_instruction() -> None:
    result = rejected(body(instruction="i" * 5), cid(), RequestLimits(max_instruction_chars=4))
    assert result.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert result.message.startswith("instruction: ")


def test_too_long_document() -> None:
    limits = RequestLimits(max_document_chars=5)
    result = rejected(body(documents=["short", "longer"]), cid(), limits)
    assert result.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert result.message == "documents[1]: 6 characters; the limit is 5"


# ----------------------------------------------------------------- decode: headers


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\xff\xfe", "not valid UTF-8"),
        (b"", "1 to 256 characters"),
        (b"x" * 257, "1 to 256 characters"),
    ],
)
def test_bad_correlation_header_falls_back_to_body_id(raw: bytes, fragment: str) -> None:
    result = rejected(body(id="from-body"), cid(raw))
    assert (result.correlation_id, result.code) == ("from-body", ErrorCode.INVALID_REQUEST)
    assert "'correlation-id'" in result.message and fragment in result.message


def test_bad_correlation_header_without_body_id() -> None:
    result = rejected(body(), cid(b"\xc3\x28"))
    assert result.correlation_id is None
    assert "not valid UTF-8" in result.message


@pytest.mark.parametrize("raw", [b"-1", b"abc", b"1.5", b" 3", b"", b"+3", b"99999999999"])
def test_bad_reply_partition(raw: bytes) -> None:
    headers = [*cid(), ("reply-topic", b"rerank.replies.x"), ("reply-partition", raw)]
    result = rejected(body(), headers)
    assert (result.correlation_id, result.code) == ("c-1", ErrorCode.INVALID_REQUEST)
    assert "'reply-partition' must be an integer >= 0" in result.message
    assert result.route == ReplyRoute("rerank.replies.x", None)


@pytest.mark.parametrize("raw", [b"", b"has space", b"bad/topic", b"t" * 250, b"\xff"])
def test_bad_reply_topic_falls_back_to_default_route(raw: bytes) -> None:
    result = rejected(body(), [*cid(), ("reply-topic", raw), ("reply-partition", b"2")])
    assert (result.correlation_id, result.code) == ("c-1", ErrorCode.INVALID_REQUEST)
    assert "'reply-topic'" in result.message
    assert result.route == ReplyRoute(None, 2)


@pytest.mark.parametrize("raw", [b"abc", b"-5", b"1.7e12", b"", b"1" * 19, b"\xff"])
def test_bad_deadline(raw: bytes) -> None:
    result = rejected(body(), [*cid(), ("deadline-ms", raw)])
    assert (result.correlation_id, result.code) == ("c-1", ErrorCode.INVALID_REQUEST)
    assert "'deadline-ms'" in result.message


def test_header_error_keeps_valid_route_for_the_reply() -> None:
    headers = [*cid(), ("reply-topic", b"rerank.replies.me"), ("deadline-ms", b"soon")]
    assert rejected(body(), headers).route == ReplyRoute("rerank.replies.me", None)


def test_decode_never_raises_on_mangled_records() -> None:
    rng = random.Random(7)
    seed = body(id="x", top_n=1, instruction="i")
    for _ in range(2000):
        value = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            value[rng.randrange(len(value))] = rng.randrange(256)
        headers = [("correlation-id", bytes(rng.randrange(256) for _ in range(rng.randint(0, 4))))]
        assert isinstance(decode_request(bytes(value), headers, LIMITS), DecodedRequest | Rejection)


# ------------------------------------------------------------------------ encoding


def success(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": "m",
        "documents": ["d0", "d1", "d2", "d3"],
        "scores": [0.2, 0.9, 0.2, 0.5],
        "logits": [-1.4, 2.2, -1.4, 0.0],
        "top_n": None,
        "return_documents": False,
        "raw_scores": False,
        "prompt_tokens": 400,
        "queue_ms": 1.5,
        "inference_ms": 10.25,
        "total_ms": 12.0,
    }
    args.update(overrides)
    raw = encode_success("c-1", **args)
    assert list(REPLY_VALIDATOR.iter_errors(orjson.loads(raw))) == []
    RerankReply.model_validate_json(raw)
    reply: dict[str, Any] = orjson.loads(raw)
    return reply


def test_success_sorted_best_first_with_stable_ties() -> None:
    reply = success()
    assert reply["results"] == [
        {"index": 1, "relevance_score": 0.9},
        {"index": 3, "relevance_score": 0.5},
        {"index": 0, "relevance_score": 0.2},
        {"index": 2, "relevance_score": 0.2},
    ]
    assert reply["id"] == "c-1" and reply["model"] == "m"
    assert reply["usage"] == {"prompt_tokens": 400}
    assert reply["timing_ms"] == {"queue": 1.5, "inference": 10.25, "total": 12.0}


@pytest.mark.parametrize(
    ("top_n", "expected"), [(1, [1]), (2, [1, 3]), (4, [1, 3, 0, 2]), (10, [1, 3, 0, 2])]
)
def test_success_cut_to_top_n(top_n: int, expected: list[int]) -> None:
    assert [r["index"] for r in success(top_n=top_n)["results"]] == expected


def test_success_return_documents() -> None:
    results = success(return_documents=True, top_n=2)["results"]
    assert results == [
        {"index": 1, "relevance_score": 0.9, "document": "d1"},
        {"index": 3, "relevance_score": 0.5, "document": "d3"},
    ]


def test_success_raw_scores_report_logits() -> None:
    results = success(raw_scores=True, scores=[0.9, 0.1, 0.5, 0.2])["results"]
    assert [(r["index"], r["relevance_score"]) for r in results] == [
        (1, 2.2),
        (3, 0.0),
        (0, -1.4),
        (2, -1.4),
    ]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_success_rejects_non_finite_scores(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        success(scores=[0.1, bad, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        success(raw_scores=True, logits=[0.1, 0.2, bad, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        success(total_ms=bad)


def test_success_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="4 documents"):
        success(scores=[0.1, 0.2])


def test_success_clamps_negative_timing_and_rounds() -> None:
    timing = success(queue_ms=-0.01, inference_ms=1.23456789)["timing_ms"]
    assert timing["queue"] == 0.0
    assert timing["inference"] == 1.235


def test_encode_result_from_engine_result() -> None:
    request = decoded(body(top_n=1, return_documents=True), cid())
    result = ScoreResult(
        logits=(-2.0, 3.0),
        scores=(0.12, 0.95),
        prompt_tokens=99,
        truncated=(False, False),
        queue_ms=1.0,
        inference_ms=2.0,
    )
    reply = orjson.loads(encode_result(request, "qwen", result, total_ms=4.0))
    assert reply == {
        "id": "c-1",
        "model": "qwen",
        "results": [{"index": 1, "relevance_score": 0.95, "document": "a queue"}],
        "usage": {"prompt_tokens": 99},
        "timing_ms": {"queue": 1.0, "inference": 2.0, "total": 4.0},
    }


def test_truncated_documents_are_named_in_the_reply_whatever_top_n_keeps() -> None:
    """Document 2 was cut to fit the model; the reply says so although top_n=1 drops it."""
    request = decoded(body(documents=["a log", "a queue", "a long manual " * 900], top_n=1), cid())
    result = ScoreResult(
        logits=(0.0, 3.0, -1.0),
        scores=(0.5, 0.95, 0.27),
        prompt_tokens=8192,
        truncated=(False, False, True),
        queue_ms=1.0,
        inference_ms=2.0,
    )
    raw = encode_result(request, "qwen", result, total_ms=4.0)
    reply = orjson.loads(raw)
    assert reply["truncated"] == [2]
    assert [r["index"] for r in reply["results"]] == [1]
    assert list(REPLY_VALIDATOR.iter_errors(reply)) == []
    assert RerankReply.model_validate_json(raw).truncated == [2]
    assert success(truncated=[True, False, False, True])["truncated"] == [0, 3]


def test_nothing_truncated_leaves_the_field_out() -> None:
    """Such a reply is byte for byte what it was before the field existed, so readers
    that validate against the older schema (no 'truncated') still accept it."""
    assert "truncated" not in success(truncated=[False] * 4)
    assert "truncated" not in success()  # an engine that reports no flags


def test_success_rejects_a_truncation_flag_count_that_is_not_the_document_count() -> None:
    with pytest.raises(ValueError, match="truncation flags"):
        success(truncated=[True])


def test_truncate_is_a_request_option_on_by_default() -> None:
    assert decoded(body(), cid()).request.truncate is True
    assert decoded(body(truncate=False), cid()).request.truncate is False
    assert rejected(body(truncate="no"), cid()).message == "truncate: must be a boolean, got string"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_encode_error(code: ErrorCode) -> None:
    raw = encode_error("c-1", code.value, "it broke", code == ErrorCode.INTERNAL)
    assert orjson.loads(raw) == {
        "id": "c-1",
        "error": {
            "code": code.value,
            "message": "it broke",
            "retriable": code == ErrorCode.INTERNAL,
        },
    }
    assert list(REPLY_VALIDATOR.iter_errors(orjson.loads(raw))) == []
    ErrorReply.model_validate_json(raw)


def test_encode_error_unknown_code() -> None:
    with pytest.raises(ValueError):
        encode_error("c-1", "oops", "m", False)


def test_encode_rejection() -> None:
    rejection = rejected(b"{", cid())
    reply = orjson.loads(encode_rejection(rejection))
    assert reply["id"] == "c-1" and reply["error"]["code"] == "invalid_request"
    assert reply["error"]["retriable"] is False
    with pytest.raises(ValueError):
        encode_rejection(rejected(b"{", []))


def test_reply_headers_exact_bytes() -> None:
    assert reply_headers("c-1") == [("correlation-id", b"c-1")]
    assert reply_headers("ключ") == [("correlation-id", "ключ".encode())]


def test_dlq_headers_exact_bytes() -> None:
    assert dlq_headers(
        ErrorCode.INVALID_REQUEST, "no correlation id", "rerank.requests", 3, 12345
    ) == [
        ("error-code", b"invalid_request"),
        ("error-message", b"no correlation id"),
        ("source-topic", b"rerank.requests"),
        ("source-partition", b"3"),
        ("source-offset", b"12345"),
    ]


def test_dlq_headers_clip_long_messages_and_check_codes() -> None:
    headers = dict(dlq_headers("internal", "m" * 5000, "t", 0, 0))
    assert len(headers["error-message"]) <= 1000
    with pytest.raises(ValueError):
        dlq_headers("nope", "m", "t", 0, 0)


def test_codec_bench_runs() -> None:
    """The micro-benchmark stays runnable (its numbers are not checked)."""
    from benchmarks import codec_bench

    assert set(codec_bench.run(iterations=3, documents=2, doc_bytes=16)) == {
        "decode",
        "encode",
        "decode+encode",
    }


@pytest.mark.parametrize("field", ["max_documents", "max_request_bytes", "max_query_chars"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RequestLimits(**{field: 0})
