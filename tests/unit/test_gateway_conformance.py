"""The gateway's answers against the APIs it imitates, as published by their owners:

- the TEI route against TEI's own ``openapi.json`` (v1.9.3, tests/conformance/tei): every
  documented request field is taken; every answer, and every error body, validates against
  the response schema of its status, with no field the schema does not name;
- the Cohere routes against the ``cohere`` SDK's own response models, through the SDK
  itself: what it deserialises, and the error class it raises for each status.

The service behind the gateway is a fake of the SDK client (the HTTP side is what is held
to the published shapes; tests/integration/test_gateway.py runs it all for real).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import cohere
import pydantic
import pytest
from aiohttp.test_utils import TestServer
from cohere import errors as cohere_errors
from cohere.types import RerankResponse
from cohere.v2.types import V2RerankResponse
from jsonschema import Draft202012Validator

from gateway.app import Gateway
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from producer_sdk.errors import (
    MalformedReply,
    RerankError,
    RerankErrorReply,
    RerankTimeout,
)
from producer_sdk.result import RankedDocument, RerankResult, Timing, Usage

OPENAPI = json.loads(
    (Path(__file__).resolve().parents[1] / "conformance" / "tei" / "openapi.json").read_text()
)
RERANK = OPENAPI["paths"]["/rerank"]["post"]
TOKEN = "secret"
NO_RETRIES: Any = {"max_retries": 0}


class FakeService:
    """Ranks documents by length, longest first, or raises ``error``."""

    def __init__(self) -> None:
        self.error: RerankError | None = None

    async def rerank(self, query: str, documents: Sequence[str], **options: Any) -> RerankResult:
        if self.error is not None:
            raise self.error
        order = sorted(range(len(documents)), key=lambda i: -len(documents[i]))
        top_n = options.get("top_n") or len(order)
        ranked = [RankedDocument(i, 1.0 / (rank + 2)) for rank, i in enumerate(order[:top_n])]
        return RerankResult("id-1", "fake", ranked, Usage(10), Timing(0.1, 0.2, 0.3))


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, FakeService]]:
    """A gateway on a real local port (so real HTTP clients can call it), and its service."""
    service = FakeService()
    settings = GatewaySettings(api_token=TOKEN, max_body_bytes=2000, max_concurrency=1)
    gateway = Gateway(settings, lambda: service, GatewayMetrics())  # type: ignore[arg-type, return-value]
    server = TestServer(gateway.make_app())
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), service
    finally:
        await server.close()


# -------------------------------------------------------------------------------- TEI


def openapi_validator(ref: str) -> Draft202012Validator:
    """A validator of ``ref`` (a "#/components/..." pointer) within TEI's openapi.json."""
    return Draft202012Validator({**OPENAPI, "$ref": ref})


def response_schema_ref(status: int) -> str:
    content = RERANK["responses"][str(status)]["content"]["application/json"]
    return str(content["schema"]["$ref"])


def assert_named_by_schema(instance: Any, schema: dict[str, Any]) -> None:
    """Every field of ``instance`` is a property its (resolved) schema names."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = OPENAPI["components"]["schemas"][name]
    if schema.get("type") == "array":
        for item in instance:
            assert_named_by_schema(item, schema["items"])
    elif schema.get("type") == "object":
        extra = set(instance) - set(schema.get("properties", {}))
        assert not extra, f"fields TEI's openapi.json does not name: {extra}"


def assert_fits_tei(status: int, answer: Any) -> None:
    ref = response_schema_ref(status)
    openapi_validator(ref).validate(answer)
    assert_named_by_schema(answer, {"$ref": ref})


async def post(url: str, path: str, body: bytes, token: str | None = TOKEN) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + path, data=body, headers=headers) as response,
    ):
        return response.status, await response.read()


async def test_every_field_of_teis_rerank_request_is_taken_and_the_answer_fits(
    served: tuple[str, FakeService],
) -> None:
    url, _ = served
    request_schema = OPENAPI["components"]["schemas"]["RerankRequest"]
    body = {
        "query": "What is Deep Learning?",
        "texts": ["Deep Learning is ...", "a recipe"],
        "raw_scores": False,
        "return_text": True,
        "truncate": False,
        "truncation_direction": "Right",
    }
    assert set(body) == set(request_schema["properties"]), "a documented field is left out"
    openapi_validator("#/components/schemas/RerankRequest").validate(body)
    status, raw = await post(url, "/rerank", json.dumps(body).encode())
    assert status == 200
    answer = json.loads(raw)
    assert_fits_tei(200, answer)
    assert [r["text"] for r in answer] == ["Deep Learning is ...", "a recipe"]


TEI_ERRORS = [
    ("not JSON", b"{not json", None, 400),
    ("no texts", b'{"query": "q"}', None, 422),
    ("texts not a list", b'{"query": "q", "texts": "a"}', None, 422),
    ("empty texts", b'{"query": "q", "texts": []}', None, 400),
    ("body too large", b'{"query": "q", "texts": ["' + b"x" * 3000 + b'"]}', None, 413),
    ("text too long", None, RerankErrorReply("invalid_request", "too long", False, "x"), 422),
    ("too many texts", None, RerankErrorReply("payload_too_large", "1001", False, "x"), 422),
    ("no reply in time", None, RerankTimeout("no reply within 30 s"), 503),
    ("late", None, RerankErrorReply("deadline_exceeded", "late", False, "x"), 429),
    ("a bug", None, RerankErrorReply("internal", "bug", False, "x"), 424),
    ("a broken reply", None, MalformedReply("not the contract"), 424),
]


@pytest.mark.parametrize(
    ("body", "error", "status"),
    [case[1:] for case in TEI_ERRORS],
    ids=[case[0] for case in TEI_ERRORS],
)
async def test_every_tei_error_fits_teis_openapi(
    served: tuple[str, FakeService], body: bytes | None, error: Any, status: int
) -> None:
    url, service = served
    service.error = error
    got, raw = await post(url, "/rerank", body or b'{"query": "q", "texts": ["a"]}')
    assert got == status
    answer = json.loads(raw)
    if str(status) in RERANK["responses"]:
        assert_fits_tei(status, answer)
    else:
        # 503 is the status of TEI's ErrorType "Unhealthy" (its router's mapping); its
        # openapi.json lists it for /health, not /rerank: the body is its ErrorResponse.
        assert status == 503 and answer["error_type"] == "Unhealthy"
        openapi_validator("#/components/schemas/ErrorResponse").validate(answer)
        assert_named_by_schema(answer, {"$ref": "#/components/schemas/ErrorResponse"})


async def test_tei_without_the_api_key_is_teis_bare_401(served: tuple[str, FakeService]) -> None:
    url, _ = served
    status, raw = await post(url, "/rerank", b'{"query": "q", "texts": ["a"]}', token=None)
    assert (status, raw) == (401, b"")


# ----------------------------------------------------------------------------- Cohere


def assert_fits_model(model: type[pydantic.BaseModel], data: Any) -> None:
    """``data`` validates as ``model`` (the SDK's own class) and has no field it does not
    declare, at any depth (the SDK's models allow extras, so validation alone would not
    notice one)."""
    model.model_validate(data)
    _only_declared(model, data, model.__name__)


def _only_declared(annotation: Any, data: Any, where: str) -> None:
    if data is None:
        return
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is not type(None):
                _only_declared(option, data, where)
                return
    elif origin is list:
        (item,) = typing.get_args(annotation)
        for i, value in enumerate(data):
            _only_declared(item, value, f"{where}[{i}]")
    elif isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        fields = {(f.alias or name): f for name, f in annotation.model_fields.items()}
        extra = set(data) - set(fields)
        assert not extra, f"{where}: fields the cohere SDK does not declare: {extra}"
        for name, field in fields.items():
            if name in data:
                _only_declared(field.annotation, data[name], f"{where}.{name}")


async def test_cohere_v2_answers_fit_the_sdks_response_model(
    served: tuple[str, FakeService],
) -> None:
    url, _ = served
    body = {"model": "m", "query": "q", "documents": ["a", "bbb", "cc"], "top_n": 2}
    status, raw = await post(url, "/v2/rerank", json.dumps(body).encode())
    assert status == 200
    assert_fits_model(V2RerankResponse, json.loads(raw))

    client = cohere.AsyncClientV2(api_key=TOKEN, base_url=url)
    ranked = await client.rerank(model="m", query="q", documents=["a", "bbb", "cc"], top_n=2)
    assert isinstance(ranked, V2RerankResponse)
    assert [r.index for r in ranked.results] == [1, 2]
    assert ranked.meta is not None and ranked.meta.api_version is not None


async def test_cohere_v1_answers_fit_the_sdks_response_model(
    served: tuple[str, FakeService],
) -> None:
    url, _ = served
    body = {"query": "q", "documents": ["a", "bbb"], "return_documents": True}
    status, raw = await post(url, "/v1/rerank", json.dumps(body).encode())
    assert status == 200
    assert_fits_model(RerankResponse, json.loads(raw))

    client = cohere.AsyncClient(api_key=TOKEN, base_url=url)
    ranked = await client.rerank(query="q", documents=["a", "bbb"], return_documents=True)
    assert isinstance(ranked, RerankResponse)
    first = ranked.results[0]
    assert first.document is not None and first.document.text == "bbb"


COHERE_ERRORS = [
    ("invalid", {"top_n": 0}, None, cohere_errors.BadRequestError),
    ("empty query", {"query": " "}, None, cohere_errors.BadRequestError),
    ("unknown field", {"top_k": 1}, None, cohere_errors.UnprocessableEntityError),
    ("late", {}, RerankErrorReply("deadline_exceeded", "late", False, "x"), "504"),
    ("no reply", {}, RerankTimeout("no reply"), cohere_errors.ServiceUnavailableError),
    ("bug", {}, RerankErrorReply("internal", "bug", False, "x"), "500"),
]


@pytest.mark.parametrize(
    ("extra", "error", "raised"),
    [case[1:] for case in COHERE_ERRORS],
    ids=[case[0] for case in COHERE_ERRORS],
)
async def test_cohere_errors_are_the_sdks_error_classes_with_cohere_bodies(
    served: tuple[str, FakeService], extra: dict[str, Any], error: Any, raised: Any
) -> None:
    url, service = served
    service.error = error
    client = cohere.AsyncClientV2(api_key=TOKEN, base_url=url)
    arguments = {"model": "m", "query": "q", "documents": ["a", "b"]} | extra
    with pytest.raises(cohere.core.api_error.ApiError) as failed:
        if "top_k" in extra:  # the SDK has no such argument: send it as a caller's typo would
            await client.rerank(
                **{k: v for k, v in arguments.items() if k != "top_k"},
                request_options={"additional_body_parameters": {"top_k": 1}, **NO_RETRIES},
            )
        else:
            await client.rerank(**arguments, request_options=NO_RETRIES)
    if isinstance(raised, str):  # statuses the v2 client maps to a class of its own
        assert failed.value.status_code == int(raised)
        by_status = {
            "504": cohere_errors.GatewayTimeoutError,
            "500": cohere_errors.InternalServerError,
        }
        assert isinstance(failed.value, by_status[raised])
    else:
        assert isinstance(failed.value, raised)
    assert set(failed.value.body) == {"id", "message"}
    if "top_k" in extra:
        assert failed.value.body["message"].startswith(
            "unknown field: parameter 'top_k' is not a valid field"
        )
