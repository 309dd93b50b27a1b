"""The gateway's request shapes and error mapping, with a fake SDK client (no Kafka here;
tests/integration/test_gateway.py runs the real binary against a real broker)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import Gateway
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings, parse_settings
from gateway.shapes import (
    COHERE_V1,
    COHERE_V2,
    NATIVE,
    TEI,
    BadRequest,
    Failure,
    shape_of_root_rerank,
)
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
        (TEI, {"query": "q", "texts": "abc"}, "`texts` must be a list"),
        (TEI, {"query": "q"}, "missing field `texts`"),
        (TEI, {"query": "q", "texts": ["a"], "raw_scores": None}, "`raw_scores`"),
        (TEI, {"query": "q", "texts": ["a"], "truncation_direction": "Left"}, "Right"),
        (TEI, {"query": "q", "texts": ["a"], "truncation_direction": "up"}, "unknown variant"),
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


def test_root_rerank_is_native_with_documents_and_tei_otherwise() -> None:
    assert shape_of_root_rerank({"query": "q", "texts": ["a"]}) is TEI
    assert shape_of_root_rerank({"query": "q", "documents": ["a"]}) is NATIVE
    assert shape_of_root_rerank(None) is TEI  # not JSON: TEI owns the path
    assert shape_of_root_rerank({"query": "q"}) is TEI


def test_tei_truncates_unless_told_not_to_as_tei_does_since_1_9() -> None:
    assert "truncate" not in TEI.parse({"query": "q", "texts": ["a"]}).options
    assert TEI.parse({"query": "q", "texts": ["a"], "truncate": False}).options["truncate"] is False
    assert "truncate" not in NATIVE.parse({"query": "q", "documents": ["a"]}).options


@pytest.mark.parametrize(
    ("shape", "body", "complaint"),
    [
        (NATIVE, {"query": "q", "documents": ["a"], "topn": 1}, "topn: unknown field (allowed: "),
        (COHERE_V2, BODY | {"top_k": 1}, "unknown field: parameter 'top_k' is not a valid field"),
        (COHERE_V1, BODY | {"texts": ["a"]}, "unknown field: parameter 'texts' is not a valid"),
    ],
)
def test_unknown_fields_are_refused_where_the_api_refuses_them(
    shape: Any, body: Any, complaint: str
) -> None:
    with pytest.raises(BadRequest, match=re.escape(complaint)) as refused:
        shape.parse(body)
    assert refused.value.failure is Failure.UNKNOWN_FIELD


def test_tei_ignores_unknown_fields_as_its_router_does() -> None:
    call = TEI.parse({"query": "q", "texts": ["a"], "top_n": 1, "model": "x"})
    assert call.documents == ["a"] and "top_n" not in call.options


def test_every_field_the_cohere_sdks_send_is_known() -> None:
    """cohere 7.3's ClientV2.rerank sends relevant_spans and priority; older v2 SDKs sent
    return_documents; the v1 client sends max_chunks_per_doc."""
    v2 = BODY | {"top_n": 1, "max_tokens_per_doc": 4096, "priority": 0, "return_documents": True}
    COHERE_V2.parse(v2 | {"relevant_spans": {"mode": "disabled"}})
    with pytest.raises(BadRequest, match="not supported"):
        COHERE_V2.parse(v2 | {"relevant_spans": {"mode": "enabled"}})
    COHERE_V1.parse(BODY | {"rank_fields": ["text"], "max_chunks_per_doc": 10})


def test_the_native_answer_names_the_model_never_a_path() -> None:
    call = NATIVE.parse({"query": "q", "documents": ["a"]})
    for reported, shown in (
        ("/models/Qwen3-Reranker-0.6B", "Qwen3-Reranker-0.6B"),
        ("Qwen/Qwen3-Reranker-0.6B", "Qwen/Qwen3-Reranker-0.6B"),
        ("qwen3-reranker", "qwen3-reranker"),
    ):
        result = RerankResult("x", reported, [RankedDocument(0, 0.5)], Usage(1), Timing(0, 0, 0))
        assert NATIVE.render(call, result)["model"] == shown


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


async def test_unknown_fields_over_http_get_each_apis_answer(
    http: TestClient[Any, Any], fake: FakeReranker
) -> None:
    native = await http.post(
        "/rerank", json={"query": "q", "documents": ["a"], "topn": 1}, headers=AUTH
    )
    assert native.status == 422
    assert (await native.json())["error"]["message"].startswith("topn: unknown field")
    cohere = await http.post("/v2/rerank", json=BODY | {"top_k": 1}, headers=AUTH)
    assert cohere.status == 422
    body = await cohere.json()
    assert set(body) == {"id", "message"}
    assert body["message"].startswith("unknown field: parameter 'top_k' is not a valid field")
    tei = await http.post("/rerank", json={"query": "q", "texts": ["a"], "x": 1}, headers=AUTH)
    assert tei.status == 200
    assert len(fake.calls) == 1  # only TEI's call reached the service


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
    fake.error = RerankErrorReply(
        "invalid_request", "documents 3: 9000 tokens; the limit is 8192", False, "x"
    )
    async for http in _client(Gateway(GatewaySettings(), lambda: fake, GatewayMetrics())):
        tei = await http.post("/rerank", json={"query": "q", "texts": ["a"]})
        native = await http.post("/rerank", json={"query": "q", "documents": ["a"]})
        assert tei.status == native.status == 422
        # TEI's callers sent `texts`: the message says so
        assert (await tei.json()) == {
            "error": "texts 3: 9000 tokens; the limit is 8192",
            "error_type": "Validation",
        }
        assert (await native.json())["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("body", "error", "status", "error_type"),
    [
        (b"{not json", None, 400, "Validation"),
        (b'{"query": "q"}', None, 422, "Validation"),
        (b'{"query": "q", "texts": []}', None, 400, "Empty"),
        (b'{"query": "q", "texts": ["' + b"x" * 600 + b'"]}', None, 413, "Validation"),
        (
            None,
            RerankErrorReply("payload_too_large", "documents: 2000", False, "x"),
            422,
            "Validation",
        ),
        (None, RerankErrorReply("deadline_exceeded", "late", False, "x"), 429, "Overloaded"),
        (None, RerankTimeout("no reply within 30 s"), 503, "Unhealthy"),
        (None, RerankErrorReply("internal", "bug", False, "x"), 424, "Backend"),
        (None, MalformedReply("not the contract"), 424, "Backend"),
    ],
)
async def test_tei_route_answers_every_error_as_tei_does(
    fake: FakeReranker, body: bytes | None, error: Any, status: int, error_type: str
) -> None:
    fake.error = error
    settings = GatewaySettings(max_body_bytes=500)
    async for http in _client(Gateway(settings, lambda: fake, GatewayMetrics())):
        sent = body if body is not None else b'{"query": "q", "texts": ["a"]}'
        response = await http.post("/rerank", data=sent)
        assert response.status == status
        answer = await response.json()
        assert set(answer) == {"error", "error_type"}
        assert answer["error_type"] == error_type
        assert "documents" not in answer["error"]


async def test_tei_route_without_the_token_is_a_bare_401(http: TestClient[Any, Any]) -> None:
    response = await http.post("/rerank", json={"query": "q", "texts": ["a"]})
    assert response.status == 401
    assert await response.read() == b""


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
    tei = {"query": "q", "texts": ["a"]}  # TEI's own default since 1.9: truncate
    native = {"query": "q", "documents": ["a"]}
    for body in (tei, tei | {"truncate": False}, native, native | {"truncate": False}):
        assert (await http.post("/rerank", json=body, headers=AUTH)).status == 200
    assert [call.get("truncate") for call in fake.calls] == [None, False, None, False]


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


def test_the_gateways_port_is_not_the_workers_side_port() -> None:
    from consumer.settings import Settings

    gateway_port = GatewaySettings().port
    assert gateway_port == 8000
    assert gateway_port != Settings.model_fields["http_port"].default == 8080


async def test_a_token_that_is_not_ascii_is_refused_not_a_crash(
    http: TestClient[Any, Any], fake: FakeReranker
) -> None:
    """hmac.compare_digest refuses two str that are not ASCII: the call was a 500 and a
    traceback instead of a 401."""
    response = await http.post(
        "/v2/rerank", json=BODY, headers={"Authorization": "Bearer sécret-ü"}
    )
    assert response.status == 401
    assert fake.calls == []
