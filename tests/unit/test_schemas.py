"""The wire-contract models and the JSON Schema files agree, and say what the contract says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError

from consumer.service.codec import Rejection, RequestLimits, decode_request
from schemas import CONTRACT_VERSION, ErrorCode, ErrorReply, RerankReply, RerankRequest, generate

SCHEMA_DIR = Path(generate.__file__).resolve().parent


def _load(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))


REQUEST_VALIDATOR = Draft202012Validator(_load(generate.REQUEST_FILE))
REPLY_VALIDATOR = Draft202012Validator(_load(generate.REPLY_FILE))

LONG_ID = "i" * 256

VALID_REQUESTS: dict[str, Any] = {
    "minimal": {"query": "q", "documents": ["a"]},
    "all fields": {
        "id": "req-1",
        "query": "what is kafka",
        "documents": ["a log", "a writer"],
        "instruction": "Find definitions",
        "top_n": 1,
        "return_documents": True,
        "raw_scores": True,
    },
    "optional fields null": {
        "query": "q",
        "documents": ["a"],
        "id": None,
        "top_n": None,
        "instruction": None,
    },
    "empty document string": {"query": "q", "documents": [""]},
    "padded unicode query": {"query": "  日本語 ", "documents": ["ü"]},
    "id of 256 characters": {"id": LONG_ID, "query": "q", "documents": ["a"]},
    "top_n above document count": {"query": "q", "documents": ["a"], "top_n": 50},
    "truncate false": {"query": "q", "documents": ["a"], "truncate": False},
}

INVALID_REQUESTS: dict[str, Any] = {
    "not an object (array)": [{"query": "q", "documents": ["a"]}],
    "not an object (string)": "query",
    "not an object (null)": None,
    "missing query": {"documents": ["a"]},
    "missing documents": {"query": "q"},
    "empty query": {"query": "", "documents": ["a"]},
    "whitespace query": {"query": " \n\t ", "documents": ["a"]},
    "query not a string": {"query": 5, "documents": ["a"]},
    "query null": {"query": None, "documents": ["a"]},
    "zero documents": {"query": "q", "documents": []},
    "documents a string": {"query": "q", "documents": "abc"},
    "document an integer": {"query": "q", "documents": ["a", 1]},
    "document null": {"query": "q", "documents": [None]},
    "document an object": {"query": "q", "documents": [{"text": "a"}]},
    "top_n zero": {"query": "q", "documents": ["a"], "top_n": 0},
    "top_n negative": {"query": "q", "documents": ["a"], "top_n": -1},
    "top_n a string": {"query": "q", "documents": ["a"], "top_n": "5"},
    "top_n a boolean": {"query": "q", "documents": ["a"], "top_n": True},
    "top_n a fraction": {"query": "q", "documents": ["a"], "top_n": 2.5},
    "return_documents a string": {"query": "q", "documents": ["a"], "return_documents": "true"},
    "return_documents an integer": {"query": "q", "documents": ["a"], "return_documents": 1},
    "raw_scores null": {"query": "q", "documents": ["a"], "raw_scores": None},
    "unknown field": {"query": "q", "documents": ["a"], "topn": 3},
    "empty id": {"id": "", "query": "q", "documents": ["a"]},
    "id too long": {"id": LONG_ID + "x", "query": "q", "documents": ["a"]},
    "id an integer": {"id": 5, "query": "q", "documents": ["a"]},
    "instruction an integer": {"query": "q", "documents": ["a"], "instruction": 7},
    "truncate null": {"query": "q", "documents": ["a"], "truncate": None},
    "truncate a string": {"query": "q", "documents": ["a"], "truncate": "false"},
}

_SUCCESS = {
    "id": "req-1",
    "model": "Qwen/Qwen3-Reranker-0.6B",
    "results": [
        {"index": 1, "relevance_score": 0.93, "document": "b"},
        {"index": 0, "relevance_score": 0.12, "document": "a"},
    ],
    "usage": {"prompt_tokens": 120},
    "timing_ms": {"queue": 0.5, "inference": 12.25, "total": 14.0},
}
_ERROR = {
    "id": "req-1",
    "error": {"code": "invalid_request", "message": "query: field required", "retriable": False},
}


def _with(base: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of base with one value replaced (value=_DROP removes the key)."""
    copy = json.loads(json.dumps(base))
    node = copy
    for key in path[:-1]:
        node = node[key]
    if value is _DROP:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return copy


_DROP = object()

VALID_REPLIES: dict[str, Any] = {
    "success": _SUCCESS,
    "success without documents": _with(
        _SUCCESS, ("results",), [{"index": 0, "relevance_score": -3.5}]
    ),
    "success with no results": _with(_SUCCESS, ("results",), []),
    "integer score": _with(_SUCCESS, ("results", 0, "relevance_score"), 1),
    **{f"error {code.value}": _with(_ERROR, ("error", "code"), code.value) for code in ErrorCode},
    "retriable error": _with(_ERROR, ("error", "retriable"), True),
    "success with truncated documents": _with(_SUCCESS, ("truncated",), [0, 5]),
}

INVALID_REPLIES: dict[str, Any] = {
    "success missing usage": _with(_SUCCESS, ("usage",), _DROP),
    "success missing timing": _with(_SUCCESS, ("timing_ms",), _DROP),
    "score a string": _with(_SUCCESS, ("results", 0, "relevance_score"), "0.9"),
    "negative index": _with(_SUCCESS, ("results", 0, "index"), -1),
    "index a string": _with(_SUCCESS, ("results", 0, "index"), "1"),
    "document null": _with(_SUCCESS, ("results", 0, "document"), None),
    "negative timing": _with(_SUCCESS, ("timing_ms", "queue"), -1.0),
    "prompt_tokens a fraction": _with(_SUCCESS, ("usage", "prompt_tokens"), 1.5),
    "unknown field in result": _with(_SUCCESS, ("results", 0, "rank"), 1),
    "empty id": _with(_SUCCESS, ("id",), ""),
    "unknown error code": _with(_ERROR, ("error", "code"), "bogus"),
    "retriable a string": _with(_ERROR, ("error", "retriable"), "no"),
    "error without message": _with(_ERROR, ("error", "message"), _DROP),
    "both success and error": {**_SUCCESS, "error": _ERROR["error"]},
    "neither": {"id": "req-1"},
    "not an object": [_ERROR],
    "truncated null": _with(_SUCCESS, ("truncated",), None),
    "truncated a negative index": _with(_SUCCESS, ("truncated",), [-1]),
    "truncated not a list": _with(_SUCCESS, ("truncated",), 3),
    "truncated in an error reply": {**_ERROR, "truncated": [0]},
}


def _pydantic_accepts(models: tuple[type[BaseModel], ...], payload: Any) -> bool:
    raw = orjson.dumps(payload)
    accepted = 0
    for model in models:
        try:
            model.model_validate_json(raw)
        except ValidationError:
            continue
        accepted += 1
    return accepted == 1


# ------------------------------------------------------------------- files vs models


def test_schema_files_match_models() -> None:
    for name, text in generate.expected_files().items():
        assert (SCHEMA_DIR / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run python -m schemas.generate"
        )


def test_generate_is_deterministic_and_check_passes(tmp_path: Path) -> None:
    assert generate.main(["--dir", str(tmp_path)]) == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert generate.main(["--dir", str(tmp_path), "--check"]) == 0
    assert generate.main(["--dir", str(tmp_path)]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    assert set(first) == {generate.REQUEST_FILE, generate.REPLY_FILE}
    for text in first.values():
        assert text.endswith(b"}\n")
        parsed = json.loads(text)
        assert json.dumps(parsed, indent=2, sort_keys=True, ensure_ascii=False) + "\n" == (
            text.decode("utf-8")
        )


def test_check_reports_drift(tmp_path: Path) -> None:
    assert generate.main(["--dir", str(tmp_path), "--check"]) == 1  # files missing
    generate.main(["--dir", str(tmp_path)])
    path = tmp_path / generate.REQUEST_FILE
    path.write_text(path.read_text(encoding="utf-8").replace('"minItems": 1', '"minItems": 0'))
    assert generate.main(["--dir", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("name", [generate.REQUEST_FILE, generate.REPLY_FILE])
def test_schema_files_are_valid_2020_12_with_metadata(name: str) -> None:
    schema = _load(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(name) and f"v{CONTRACT_VERSION}" in schema["$id"]
    assert schema["title"] and schema["description"]
    assert schema["x-contract-version"] == CONTRACT_VERSION


def test_reply_schema_is_success_or_error() -> None:
    schema = _load(generate.REPLY_FILE)
    assert schema["oneOf"] == [{"$ref": "#/$defs/RerankReply"}, {"$ref": "#/$defs/ErrorReply"}]
    codes = schema["$defs"]["ErrorCode"]["enum"]
    assert codes == ["invalid_request", "payload_too_large", "deadline_exceeded", "internal"]


def test_request_schema_required_and_closed() -> None:
    schema = _load(generate.REQUEST_FILE)
    assert schema["required"] == ["query", "documents"]
    assert schema["additionalProperties"] is False


# ---------------------------------------------------------- samples: same verdicts


@pytest.mark.parametrize("name", sorted(VALID_REQUESTS))
def test_valid_request_samples(name: str) -> None:
    payload = VALID_REQUESTS[name]
    assert list(REQUEST_VALIDATOR.iter_errors(payload)) == []
    RerankRequest.model_validate_json(orjson.dumps(payload))
    decoded = decode_request(orjson.dumps(payload), [("correlation-id", b"c1")], RequestLimits())
    assert not isinstance(decoded, Rejection), decoded


@pytest.mark.parametrize("name", sorted(INVALID_REQUESTS))
def test_invalid_request_samples(name: str) -> None:
    payload = INVALID_REQUESTS[name]
    assert list(REQUEST_VALIDATOR.iter_errors(payload)) != [], "schema accepted it"
    with pytest.raises(ValidationError):
        RerankRequest.model_validate_json(orjson.dumps(payload))
    decoded = decode_request(orjson.dumps(payload), [("correlation-id", b"c1")], RequestLimits())
    assert isinstance(decoded, Rejection) and decoded.code == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("name", sorted(VALID_REPLIES))
def test_valid_reply_samples(name: str) -> None:
    payload = VALID_REPLIES[name]
    assert list(REPLY_VALIDATOR.iter_errors(payload)) == []
    assert _pydantic_accepts((RerankReply, ErrorReply), payload)


@pytest.mark.parametrize("name", sorted(INVALID_REPLIES))
def test_invalid_reply_samples(name: str) -> None:
    payload = INVALID_REPLIES[name]
    assert list(REPLY_VALIDATOR.iter_errors(payload)) != [], "schema accepted it"
    assert not _pydantic_accepts((RerankReply, ErrorReply), payload)


def test_integral_float_is_not_an_integer_for_the_models() -> None:
    """The one known divergence: JSON Schema counts 5.0 as an integer, the models don't."""
    payload = {"query": "q", "documents": ["a"], "top_n": 5.0}
    assert list(REQUEST_VALIDATOR.iter_errors(payload)) == []
    with pytest.raises(ValidationError):
        RerankRequest.model_validate_json(orjson.dumps(payload))


def test_request_defaults() -> None:
    request = RerankRequest.model_validate_json(b'{"query": "q", "documents": ["a"]}')
    assert request.id is None and request.instruction is None and request.top_n is None
    assert request.return_documents is False and request.raw_scores is False
    assert request.truncate is True


def test_unknown_field_error_names_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        RerankRequest.model_validate({"query": "q", "documents": ["a"], "topn": 3})
    assert [e["loc"] for e in info.value.errors()] == [("topn",)]
    assert info.value.errors()[0]["type"] == "extra_forbidden"
