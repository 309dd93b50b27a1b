"""SDK argument checks, reply parsing and the error hierarchy; no broker needed."""

from __future__ import annotations

import math
from typing import Any

import pytest

from producer_sdk import (
    ClientClosed,
    ClientStartError,
    DeliveryError,
    InvalidArgument,
    MalformedReply,
    RerankClient,
    RerankError,
    RerankErrorReply,
    RerankTimeout,
    SyncRerankClient,
)
from producer_sdk.request import build_request_body, check_timeout
from producer_sdk.result import parse_reply

GOOD_QUERY = "what is kafka?"
GOOD_DOCUMENTS = ["a distributed log", "a novelist"]


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        ({"query": ""}, "query is empty"),
        ({"query": " \n\t"}, "query is empty"),
        ({"query": None}, "query must be a str"),
        ({"query": b"bytes"}, "query must be a str"),
        ({"documents": []}, "documents is empty"),
        ({"documents": "one string"}, "documents must be a list"),
        ({"documents": None}, "documents must be a list"),
        ({"documents": {"a": 1}}, "documents must be a list"),
        ({"documents": ["fine", 3]}, r"documents\[1\] must be a str"),
        ({"documents": ["fine", None]}, r"documents\[1\] must be a str"),
        ({"instruction": 5}, "instruction must be a str"),
        ({"top_n": 0}, "top_n must be at least 1"),
        ({"top_n": -3}, "top_n must be at least 1"),
        ({"top_n": 1.5}, "top_n must be an int"),
        ({"top_n": True}, "top_n must be an int"),
        ({"top_n": "2"}, "top_n must be an int"),
        ({"return_documents": "yes"}, "return_documents must be a bool"),
        ({"raw_scores": 1}, "raw_scores must be a bool"),
        ({"truncate": None}, "truncate must be a bool"),
    ],
)
def test_bad_arguments_are_named(arguments: dict[str, Any], complaint: str) -> None:
    call: dict[str, Any] = {"query": GOOD_QUERY, "documents": GOOD_DOCUMENTS, **arguments}
    query, documents = call.pop("query"), call.pop("documents")

    with pytest.raises(InvalidArgument, match=complaint):
        build_request_body(query, documents, **call)


def test_body_holds_only_what_was_asked_for() -> None:
    assert build_request_body(GOOD_QUERY, tuple(GOOD_DOCUMENTS)) == {
        "query": GOOD_QUERY,
        "documents": GOOD_DOCUMENTS,
    }


def test_body_carries_every_option() -> None:
    body = build_request_body(
        GOOD_QUERY,
        GOOD_DOCUMENTS,
        instruction="find answers",
        top_n=1,
        return_documents=True,
        raw_scores=True,
    )
    assert body == {
        "query": GOOD_QUERY,
        "documents": GOOD_DOCUMENTS,
        "instruction": "find answers",
        "top_n": 1,
        "return_documents": True,
        "raw_scores": True,
    }


def test_truncate_is_sent_only_when_off() -> None:
    """On is the service's default; a worker older than the option then sees the same
    request as before, while truncate=False reaches it (and an old one refuses it)."""
    assert "truncate" not in build_request_body(GOOD_QUERY, GOOD_DOCUMENTS, truncate=True)
    assert build_request_body(GOOD_QUERY, GOOD_DOCUMENTS, truncate=False)["truncate"] is False


def test_split_long_documents_is_sent_only_when_given() -> None:
    """None leaves it to the worker's default (and an old worker sees the same request)."""
    assert "split_long_documents" not in build_request_body(GOOD_QUERY, GOOD_DOCUMENTS)
    for value in (True, False):
        body = build_request_body(GOOD_QUERY, GOOD_DOCUMENTS, split_long_documents=value)
        assert body["split_long_documents"] is value
    with pytest.raises(InvalidArgument, match="split_long_documents must be a bool"):
        build_request_body(GOOD_QUERY, GOOD_DOCUMENTS, split_long_documents="yes")  # type: ignore[arg-type]


def test_a_window_in_a_reply_is_parsed_and_written_back() -> None:
    from producer_sdk.result import DocumentWindow, parse_reply

    body = {
        "id": "c", "model": "m", "usage": {"prompt_tokens": 3},
        "timing_ms": {"queue": 0.0, "inference": 1.0, "total": 2.0},
        "results": [
            {"index": 1, "relevance_score": 0.9,
             "window": {"index": 2, "count": 3, "start": 10, "end": 40}},
            {"index": 0, "relevance_score": 0.1},
        ],
    }  # fmt: skip
    result = parse_reply(body, 2)
    assert result[0].window == DocumentWindow(2, 3, 10, 40) and result[1].window is None
    assert result.to_dict()["results"] == body["results"]


def test_empty_documents_are_allowed_as_items() -> None:
    # An empty candidate is odd but legal by the contract: it is scored, not refused.
    assert build_request_body(GOOD_QUERY, [""])["documents"] == [""]


@pytest.mark.parametrize("timeout", [0, -1, -0.1, math.nan, math.inf, "5", None, True])
def test_bad_timeouts_are_refused(timeout: Any) -> None:
    with pytest.raises(InvalidArgument, match="timeout"):
        check_timeout(timeout)


def test_good_timeout_is_a_float() -> None:
    assert check_timeout(2) == 2.0
    assert isinstance(check_timeout(2), float)


# -- the client refuses bad arguments before touching Kafka -------------------------------


async def test_rerank_checks_arguments_before_anything_else() -> None:
    client = RerankClient(bootstrap_servers="127.0.0.1:1")  # never started, never connects

    with pytest.raises(InvalidArgument, match="query is empty"):
        await client.rerank("", GOOD_DOCUMENTS)
    with pytest.raises(InvalidArgument, match="timeout"):
        await client.rerank(GOOD_QUERY, GOOD_DOCUMENTS, timeout=0)
    with pytest.raises(ClientClosed, match="not started"):
        await client.rerank(GOOD_QUERY, GOOD_DOCUMENTS)


@pytest.mark.parametrize(
    "options",
    [
        {"reply_partition": -1},
        {"reply_partition": True},
        {"reply_partition": "0"},
        {"default_timeout": 0},
        {"start_timeout": -1},
        {"remembered_ids": 0},
    ],
)
def test_client_constructor_refuses_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        RerankClient(bootstrap_servers="127.0.0.1:1", **options)


def test_sync_client_refuses_bad_options_without_starting() -> None:
    with pytest.raises(InvalidArgument):
        SyncRerankClient(bootstrap_servers="127.0.0.1:1", default_timeout=-5)


async def test_start_against_no_broker_raises_client_start_error() -> None:
    client = RerankClient(bootstrap_servers="127.0.0.1:1", start_timeout=5)

    with pytest.raises(ClientStartError) as raised:
        await client.start()

    assert raised.value.retriable
    with pytest.raises(ClientClosed):
        await client.rerank(GOOD_QUERY, GOOD_DOCUMENTS)


# -- error hierarchy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "retriable"),
    [
        (InvalidArgument("x"), False),
        (RerankTimeout("x"), True),
        (ClientClosed("x"), False),
        (ClientStartError("x"), True),
        (MalformedReply("x"), False),
        (DeliveryError("x", retriable=True), True),
        (RerankErrorReply("internal", "boom", retriable=True, request_id="r"), True),
        (RerankErrorReply("invalid_request", "bad", retriable=False, request_id="r"), False),
    ],
)
def test_every_error_is_a_rerank_error_with_a_retriable_flag(
    error: RerankError, retriable: bool
) -> None:
    assert isinstance(error, RerankError)
    assert error.retriable is retriable


def test_errors_also_match_the_builtin_they_resemble() -> None:
    assert isinstance(InvalidArgument("x"), ValueError)
    assert isinstance(RerankTimeout("x"), TimeoutError)


# -- reply parsing -----------------------------------------------------------------------


def success_reply(**overrides: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "id": "abc",
        "model": "Qwen/Qwen3-Reranker-0.6B",
        "results": [
            {"index": 1, "relevance_score": 0.9, "document": "a novelist"},
            {"index": 0, "relevance_score": 0.25},
        ],
        "usage": {"prompt_tokens": 120},
        "timing_ms": {"queue": 1.5, "inference": 7, "total": 9.25},
    }
    reply.update(overrides)
    return reply


def test_success_reply_becomes_a_result() -> None:
    result = parse_reply(success_reply(), document_count=2)

    assert result.id == "abc"
    assert result.model == "Qwen/Qwen3-Reranker-0.6B"
    assert result.indices == [1, 0]
    assert result.scores == [0.9, 0.25]
    assert result[0].document == "a novelist"
    assert result[1].document is None
    assert [item.index for item in result] == [1, 0]
    assert len(result) == 2
    assert result.top(1) == [result[0]]
    assert result.usage.prompt_tokens == 120
    assert (result.timing.queue_ms, result.timing.inference_ms, result.timing.total_ms) == (
        1.5,
        7.0,
        9.25,
    )


def test_result_round_trips_to_the_reply_shape() -> None:
    reply = success_reply()
    assert parse_reply(reply, document_count=2).to_dict() == {
        **reply,
        "timing_ms": {"queue": 1.5, "inference": 7.0, "total": 9.25},
    }


def test_truncated_documents_are_parsed_and_round_trip() -> None:
    reply = success_reply(truncated=[0, 1])
    result = parse_reply(reply, document_count=2)

    assert result.truncated == (0, 1)
    assert result.to_dict()["truncated"] == [0, 1]
    # Without the field (nothing cut, or an older service): empty, and left out again.
    assert parse_reply(success_reply(), document_count=2).truncated == ()
    assert "truncated" not in parse_reply(success_reply(), document_count=2).to_dict()


def test_with_documents_fills_text_from_the_request() -> None:
    result = parse_reply(success_reply(), document_count=2).with_documents(["first", "second"])
    assert [item.document for item in result] == ["second", "first"]


def test_unknown_reply_fields_are_tolerated() -> None:
    # A newer service may add fields; an older SDK keeps working.
    result = parse_reply(success_reply(extra="new field"), document_count=2)
    assert result.indices == [1, 0]


def test_error_reply_raises_its_code_message_and_flag() -> None:
    reply = {
        "id": "abc",
        "error": {"code": "deadline_exceeded", "message": "too late", "retriable": True},
    }
    with pytest.raises(RerankErrorReply) as raised:
        parse_reply(reply, document_count=2)

    assert raised.value.code == "deadline_exceeded"
    assert raised.value.message == "too late"
    assert raised.value.retriable is True
    assert raised.value.request_id == "abc"


@pytest.mark.parametrize(
    "reply",
    [
        [],
        "text",
        success_reply(results=None),
        success_reply(results=[{"index": 2, "relevance_score": 0.5}]),  # only 2 documents
        success_reply(results=[{"index": -1, "relevance_score": 0.5}]),
        success_reply(results=[{"index": True, "relevance_score": 0.5}]),
        success_reply(results=[{"index": 0, "relevance_score": "high"}]),
        success_reply(results=[{"index": 0, "relevance_score": 0.5, "document": 7}]),
        success_reply(results=["not an object"]),
        success_reply(usage={}),
        success_reply(timing_ms={"queue": 1}),
        {"id": "abc", "error": {"code": "internal"}},
        {key: value for key, value in success_reply().items() if key != "model"},
        success_reply(truncated=None),
        success_reply(truncated=[2]),  # only 2 documents
        success_reply(truncated=[True]),
        success_reply(truncated="0"),
    ],
)
def test_malformed_replies_raise_malformed_reply(reply: Any) -> None:
    with pytest.raises(MalformedReply):
        parse_reply(reply, document_count=2)
