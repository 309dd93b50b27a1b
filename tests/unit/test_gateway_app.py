"""The gateway's request shapes and error mapping, with a fake SDK client (no Kafka here;
tests/integration/test_gateway.py runs the real binary against a real broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import Gateway
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings, parse_settings
from gateway.shapes import COHERE_V1, COHERE_V2, NATIVE, TEI, BadRequest, shape_of_root_rerank
from producer_sdk.errors import (
    ClientStartError,
    DeliveryError,
    MalformedReply,
    RerankError,
    RerankErrorReply,
    RerankTimeout,
)
from producer_sdk.result import RankedDocument, RerankResult, Timing, Usage


class FakeReranker:
    """Ranks documents by length, longest first, or raises ``error``."""

    def __init__(self, error: RerankError | None = None) -> None:
        self.error = error
        self.calls: list[dict[str, Any]] = []

    async def rerank(self, query: str, documents: Sequence[str], **options: Any) -> RerankResult:
        self.calls.append({"query": query, "documents": list(documents), **options})
        if self.error is not None:
            raise self.error
        order = sorted(range(len(documents)), key=lambda i: -len(documents[i]))
        top_n = options.get("top_n") or len(order)
        ranked = [RankedDocument(i, 1.0 / (rank + 2)) for rank, i in enumerate(order[:top_n])]
        return RerankResult("id-1", "fake", ranked, Usage(10), Timing(0.1, 0.2, 0.3))


@pytest.fixture
async def fake() -> FakeReranker:
    return FakeReranker()


async def _client(gateway: Gateway) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(gateway.make_app())) as client:
        yield client


@pytest.fixture
async def http(fake: FakeReranker) -> AsyncIterator[TestClient[Any, Any]]:
    settings = GatewaySettings(api_token="secret", max_body_bytes=500)
    async for client in _client(Gateway(settings, lambda: fake, GatewayMetrics())):
        yield client


AUTH = {"Authorization": "Bearer secret"}
BODY = {"model": "m", "query": "q", "documents": ["a", "bbb", "cc"]}


# -- shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "body", "complaint"),
    [
        (COHERE_V2, [], "JSON object"),
        (COHERE_V2, {"documents": ["a"]}, "`query`"),
        (COHERE_V2, {"query": "q", "documents": []}, "`documents`"),
        (COHERE_V2, {"query": "q", "documents": ["a", 3]}, "`documents[1]`"),
        (COHERE_V2, {"query": "q", "documents": ["a"], "top_n": True}, "`top_n`"),
        (COHERE_V2, {"query": "q", "documents": ["a"], "model": 7}, "`model`"),
        (COHERE_V1, {"query": "q", "documents": [{"title": "t"}]}, "documents[0].text"),
        (COHERE_V1, {"query": "q", "documents": ["a"], "rank_fields": [1]}, "rank_fields"),
        (TEI, {"query": "q", "texts": "abc"}, "`texts`"),
        (TEI, {"query": "q", "texts": ["a"], "truncation_direction": "Left"}, "Right"),
        (NATIVE, {"query": "q", "documents": ["a"], "instruction": ["x"]}, "`instruction`"),
    ],
)
def test_each_shape_names_what_is_wrong(shape: Any, body: Any, complaint: str) -> None:
    with pytest.raises(BadRequest, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        shape.parse(body)


def test_cohere_v1_ranks_objects_on_their_rank_fields_and_echoes_them() -> None:
    documents = [{"title": "Kafka", "body": "a log", "id": 7}]
    call = COHERE_V1.parse({"query": "q", "documents": documents, "rank_fields": ["title", "body"]})
    assert call.documents == ["title: Kafka\nbody: a log"]
    result = RerankResult("x", "m", [RankedDocument(0, 0.5)], Usage(1), Timing(0, 0, 0))
    rendered = COHERE_V1.render(
        COHERE_V1.parse(
            {
                "query": "q",
                "documents": documents,
                "return_documents": True,
                "rank_fields": ["title"],
            }
        ),
        result,
    )
    assert rendered["results"][0]["document"] == documents[0]
    assert rendered["meta"]["api_version"]["version"] == "1"


def test_root_rerank_is_tei_with_texts_and_native_otherwise() -> None:
    assert shape_of_root_rerank({"query": "q", "texts": ["a"]}) is TEI
    assert shape_of_root_rerank({"query": "q", "documents": ["a"]}) is NATIVE
    assert shape_of_root_rerank(b"not json") is NATIVE


def test_tei_defaults_to_its_own_truncate_false() -> None:
    assert TEI.parse({"query": "q", "texts": ["a"]}).truncate is False
    assert NATIVE.parse({"query": "q", "documents": ["a"]}).truncate is None


# -- the HTTP side -----------------------------------------------------------------------


async def test_cohere_v2_answer_is_cohere_shaped(
    http: TestClient[Any, Any], fake: FakeReranker
) -> None:
    response = await http.post("/v2/rerank", json=BODY | {"top_n": 2}, headers=AUTH)
    assert response.status == 200
    answer = await response.json()
    assert [r["index"] for r in answer["results"]] == [1, 2]
    assert set(answer["results"][0]) == {"index", "relevance_score"}
    assert fake.calls[0]["top_n"] == 2


async def test_without_the_token_nothing_is_sent(
    http: TestClient[Any, Any], fake: FakeReranker
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic secret"}):
        response = await http.post("/v2/rerank", json=BODY, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert fake.calls == []
    assert (await http.get("/health/ready")).status == 200, "health needs no token"


async def test_a_body_over_the_limit_is_413(http: TestClient[Any, Any]) -> None:
    response = await http.post("/v2/rerank", json=BODY | {"query": "q" * 600}, headers=AUTH)
    assert response.status == 413
    assert "500 bytes" in (await response.json())["message"]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RerankErrorReply("invalid_request", "bad", False, "x"), 400),
        (RerankErrorReply("payload_too_large", "too many documents", False, "x"), 413),
        (RerankErrorReply("deadline_exceeded", "late", False, "x"), 504),
        (RerankErrorReply("internal", "engine failed", True, "x"), 503),
        (RerankErrorReply("internal", "bug", False, "x"), 500),
        (RerankTimeout("no reply within 30 s"), 503),
        (ClientStartError("broker away"), 503),
        (DeliveryError("record too large", retriable=False), 500),
        (MalformedReply("not the contract"), 502),
    ],
)
async def test_service_errors_map_to_cohere_statuses(
    fake: FakeReranker, error: RerankError, status: int
) -> None:
    fake.error = error
    async for http in _client(Gateway(GatewaySettings(), lambda: fake, GatewayMetrics())):
        response = await http.post("/v2/rerank", json=BODY)
        assert response.status == status
        assert (await response.json())["message"]
        assert ("Retry-After" in response.headers) == (status == 503)


async def test_tei_and_native_report_invalid_input_as_422(fake: FakeReranker) -> None:
    fake.error = RerankErrorReply("invalid_request", "document 3 is too long", False, "x")
    async for http in _client(Gateway(GatewaySettings(), lambda: fake, GatewayMetrics())):
        tei = await http.post("/rerank", json={"query": "q", "texts": ["a"]})
        native = await http.post("/rerank", json={"query": "q", "documents": ["a"]})
        assert tei.status == native.status == 422
        assert (await tei.json()) == {"error": "document 3 is too long", "error_type": "validation"}
        assert (await native.json())["error"]["code"] == "invalid_request"


async def test_not_connected_is_503_and_not_ready() -> None:
    async for http in _client(Gateway(GatewaySettings(), lambda: None, GatewayMetrics())):
        response = await http.post("/v2/rerank", json=BODY)
        assert response.status == 503
        ready = await http.get("/health/ready")
        assert ready.status == 503
        assert (await ready.json())["reasons"] == ["not connected to Kafka"]
        assert (await http.get("/health/live")).status == 200


def test_settings_read_the_workers_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_BOOTSTRAP_SERVERS", "kafka:9093")
    monkeypatch.setenv("RERANK_REQUEST_TOPIC", "reqs")
    monkeypatch.setenv("RERANK_GATEWAY_API_TOKEN", "t0k")
    monkeypatch.setenv("RERANK_GATEWAY_PORT", "9000")
    settings = parse_settings([])
    assert (settings.bootstrap_servers, settings.request_topic) == ("kafka:9093", "reqs")
    assert (settings.api_token, settings.port) == ("t0k", 9000)
    assert parse_settings(["--port", "9100"]).port == 9100
    with pytest.raises(SystemExit):
        parse_settings(["--max-concurrency", "0"])


async def test_truncate_reaches_the_service_only_when_the_caller_set_it(
    http: TestClient[Any, Any], fake: FakeReranker
) -> None:
    tei = {"query": "q", "texts": ["a"]}  # TEI's own default: truncate false
    native = {"query": "q", "documents": ["a"]}
    for body in (tei, native, native | {"truncate": False}):
        assert (await http.post("/rerank", json=body, headers=AUTH)).status == 200
    assert [call.get("truncate") for call in fake.calls] == [False, None, False]


async def test_split_long_documents_reaches_the_service_as_the_caller_set_it(
    http: TestClient[Any, Any], fake: FakeReranker
) -> None:
    native = {"query": "q", "documents": ["a"]}
    for body in (native, native | {"split_long_documents": True}):
        assert (await http.post("/rerank", json=body, headers=AUTH)).status == 200
    assert [call.get("split_long_documents") for call in fake.calls] == [None, True]


def test_a_bad_variable_is_a_usage_error_as_a_bad_flag_is(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("RERANK_GATEWAY_MAX_CONCURRENCY", "0"), ("RERANK_GATEWAY_PORT", "x")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(SystemExit):
                parse_settings([])
