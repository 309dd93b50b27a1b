"""``rerank-client``: output formatting, input reading and argument errors; no broker."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.settings import Settings, env_name, load_settings
from producer_sdk import NO_RETRY, RetryPolicy, cli
from producer_sdk.errors import InvalidArgument
from producer_sdk.result import RankedDocument, RerankResult, Timing, Usage

DOCUMENTS = [
    "Kafka is a distributed event log.",
    "Franz Kafka wrote The Trial.\nIt was published in 1925.",
    "Consumer groups share the partitions of a topic.",
]


def ranked_result() -> RerankResult:
    return RerankResult(
        id="corr-1",
        model="Qwen/Qwen3-Reranker-0.6B",
        results=[
            RankedDocument(index=2, score=0.98765),
            RankedDocument(index=0, score=0.5),
            RankedDocument(index=1, score=0.0123),
        ],
        usage=Usage(prompt_tokens=321),
        timing=Timing(queue_ms=1.0, inference_ms=2.0, total_ms=3.5),
    )


# -- table -----------------------------------------------------------------------------


def test_table_lists_results_best_first_with_rank_score_and_index() -> None:
    lines = cli.format_table(ranked_result(), DOCUMENTS, width=200).splitlines()

    assert lines[0].split() == ["rank", "score", "index", "document"]
    rows = [line.split(maxsplit=3) for line in lines[1:]]
    assert [row[:3] for row in rows] == [
        ["1", "0.9877", "2"],
        ["2", "0.5000", "0"],
        ["3", "0.0123", "1"],
    ]
    assert rows[0][3] == DOCUMENTS[2]


def test_table_puts_each_document_on_one_line() -> None:
    lines = cli.format_table(ranked_result(), DOCUMENTS, width=200).splitlines()

    assert len(lines) == 1 + len(DOCUMENTS)
    assert lines[3].endswith("Franz Kafka wrote The Trial. It was published in 1925.")


@pytest.mark.parametrize("width", [35, 45, 55])
def test_table_cuts_documents_to_the_width(width: int) -> None:
    lines = cli.format_table(ranked_result(), DOCUMENTS, width=width).splitlines()

    assert all(len(line) <= width for line in lines)
    assert any(line.endswith("…") for line in lines[1:])


def test_table_keeps_some_document_text_on_a_very_narrow_terminal() -> None:
    lines = cli.format_table(ranked_result(), DOCUMENTS, width=5).splitlines()

    best = DOCUMENTS[2]
    assert lines[1].endswith(best[: cli.MIN_DOCUMENT_WIDTH - 1] + "…")


def test_table_aligns_columns_for_wide_numbers() -> None:
    result = RerankResult(
        id="x",
        model="m",
        results=[RankedDocument(index=10, score=-12.5), RankedDocument(index=3, score=4.0)],
        usage=Usage(prompt_tokens=1),
        timing=Timing(0.0, 0.0, 0.0),
    )
    documents = [f"doc {n}" for n in range(11)]

    lines = cli.format_table(result, documents, width=80).splitlines()

    starts = {line.index("doc") for line in lines[1:]}
    assert len(starts) == 1  # the document column starts at the same place on every row
    assert "-12.5000" in lines[1]


# -- JSON ------------------------------------------------------------------------------


def test_json_has_the_reply_shape_with_documents() -> None:
    printed = orjson.loads(cli.format_json(ranked_result(), DOCUMENTS))

    assert printed["id"] == "corr-1"
    assert printed["model"] == "Qwen/Qwen3-Reranker-0.6B"
    assert [r["index"] for r in printed["results"]] == [2, 0, 1]
    assert [r["document"] for r in printed["results"]] == [DOCUMENTS[2], DOCUMENTS[0], DOCUMENTS[1]]
    assert printed["results"][0]["relevance_score"] == 0.98765
    assert printed["usage"] == {"prompt_tokens": 321}
    assert printed["timing_ms"] == {"queue": 1.0, "inference": 2.0, "total": 3.5}


def test_table_and_json_say_which_documents_the_service_truncated() -> None:
    result = replace(ranked_result(), truncated=(1, 2))

    lines = cli.format_table(result, DOCUMENTS, width=200).splitlines()
    printed = orjson.loads(cli.format_json(result, DOCUMENTS))

    assert len(lines) == 2 + len(DOCUMENTS)
    assert lines[-1] == "truncated to fit the model: documents 1, 2"
    assert printed["truncated"] == [1, 2]
    assert "truncated" not in orjson.loads(cli.format_json(ranked_result(), DOCUMENTS))


def test_no_truncate_flag_and_stdin_field_ask_for_an_error_instead_of_a_cut() -> None:
    assert cli.read_input(parse("q", "a"), io.StringIO()).truncate is True
    assert cli.read_input(parse("--no-truncate", "q", "a"), io.StringIO()).truncate is False
    stdin = '{"query": "q", "documents": ["a"], "truncate": false}'
    assert cli.read_input(parse(), io.StringIO(stdin)).truncate is False
    with pytest.raises(InvalidArgument, match="truncate must be a bool"):
        cli.read_input(parse(), io.StringIO('{"query": "q", "documents": ["a"], "truncate": 0}'))


# -- input -----------------------------------------------------------------------------


def parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(list(argv))


def test_input_from_arguments() -> None:
    given = cli.read_input(parse("--top-n", "2", "query", "a", "b"), io.StringIO())

    assert given == cli.RerankInput(query="query", documents=["a", "b"], top_n=2)


def test_input_from_json_on_stdin() -> None:
    stdin = io.StringIO(
        '{"query": "q", "documents": ["a", "b"], "instruction": "find", "top_n": 1}'
    )
    given = cli.read_input(parse(), stdin)

    assert given == cli.RerankInput(query="q", documents=["a", "b"], instruction="find", top_n=1)


def test_flags_win_over_json_fields() -> None:
    stdin = io.StringIO('{"query": "q", "documents": ["a"], "instruction": "x", "top_n": 1}')
    given = cli.read_input(parse("--top-n", "3", "--instruction", "y"), stdin)

    assert (given.top_n, given.instruction) == (3, "y")


@pytest.mark.parametrize(
    ("stdin", "complaint"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be an object"),
        ('{"documents": ["a"]}', "lacks 'query'"),
        ('{"query": "q"}', "lacks 'documents'"),
        ('{"query": "q", "documents": ["a"], "topn": 2}', "unknown fields: topn"),
        ('{"query": "q", "documents": []}', "documents is empty"),
        ('{"query": "q", "documents": [1]}', r"documents\[0\] must be a str"),
        ('{"query": "q", "documents": ["a"], "top_n": "2"}', "top_n must be an int"),
    ],
)
def test_bad_stdin_is_refused(stdin: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument, match=complaint):
        cli.read_input(parse(), io.StringIO(stdin))


def test_query_without_documents_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="at least one document"):
        cli.read_input(parse("lonely query"), io.StringIO())


def test_retry_flags_make_the_clients_retry_policy() -> None:
    assert cli.retry_policy(parse("q", "d")) == RetryPolicy()
    assert cli.retry_policy(parse("--retries", "0", "q", "d")) == NO_RETRY
    assert cli.retry_policy(parse("--retries", "4", "--retry-budget", "90", "q", "d")) == (
        RetryPolicy(attempts=5, budget=90.0)
    )


# -- exit codes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["lonely query"], "at least one document"),
        (["--top-n", "0", "q", "d"], "top_n must be at least 1"),
        (["--timeout", "0", "q", "d"], "timeout"),
        (["", "d"], "query is empty"),
        (["--security-protocol", "SASL_SSL", "q", "d"], "SASL"),
        (["--ssl-keyfile", "key.pem", "q", "d"], "certificate"),
        (["--retries", "-1", "q", "d"], "--retries must be 0 or more"),
        (["--retry-budget", "0", "q", "d"], "budget must be a positive number"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["--bootstrap-servers", "127.0.0.1:1", *argv])

    captured = capsys.readouterr()
    assert status == cli.EXIT_BAD_ARGS
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert complaint in captured.err


def test_unknown_flag_exits_2() -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["--no-such-flag", "q", "d"])
    assert raised.value.code == cli.EXIT_BAD_ARGS


def test_bad_json_on_stdin_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("{"))

    status = cli.main(["--bootstrap-servers", "127.0.0.1:1"])

    assert status == cli.EXIT_BAD_ARGS
    assert "not valid JSON" in capsys.readouterr().err


def test_unreachable_broker_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["--bootstrap-servers", "127.0.0.1:1", "--timeout", "5", "q", "d"])

    captured = capsys.readouterr()
    assert status == cli.EXIT_FAILED
    assert captured.err.count("\n") == 1
    assert "ClientStartError" in captured.err


def test_bootstrap_servers_default_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RERANK_BOOTSTRAP_SERVERS", "kafka-a:9092,kafka-b:9092")

    assert parse("q", "d").bootstrap_servers == "kafka-a:9092,kafka-b:9092"


# -- security: the worker's settings -------------------------------------------------------


def worker_security_fields() -> list[str]:
    return [
        name
        for name, field in Settings.model_fields.items()
        if isinstance(field.json_schema_extra, dict)
        and field.json_schema_extra.get("group") == "Kafka security"
    ]


def test_security_flags_default_to_the_workers_environment_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fields = worker_security_fields()
    assert {"security_protocol", "sasl_password", "ssl_cafile"} <= set(fields)
    values = {name: f"value of {name}" for name in fields}
    values.update(security_protocol="sasl_ssl", sasl_mechanism="scram-sha-512")
    for name, value in values.items():
        monkeypatch.setenv(env_name(name), value)

    args = parse("q", "d")

    # Every security setting of the worker has its flag here, read from the same variable.
    assert {name: getattr(args, name) for name in values} == {
        **values,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
    }


def test_missing_ssl_file_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--security-protocol", "ssl", "--ssl-cafile", "no-such-ca.pem", "q", "d"]

    status = cli.main(["--bootstrap-servers", "127.0.0.1:1", *argv])

    captured = capsys.readouterr()
    assert status == cli.EXIT_BAD_ARGS
    assert captured.err.count("\n") == 1
    assert "--ssl-cafile: no such file: no-such-ca.pem" in captured.err


def test_unloadable_ssl_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_certificate = tmp_path / "ca.pem"
    not_a_certificate.write_text("not a certificate\n")
    argv = ["--security-protocol", "SSL", "--ssl-cafile", str(not_a_certificate), "q", "d"]

    status = cli.main(["--bootstrap-servers", "127.0.0.1:1", *argv])

    captured = capsys.readouterr()
    assert status == cli.EXIT_BAD_ARGS
    assert captured.err.count("\n") == 1
    assert "SSL settings do not load" in captured.err


def test_cli_and_worker_connect_alike_from_the_same_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RERANK_SECURITY_PROTOCOL", "sasl_plaintext")
    monkeypatch.setenv("RERANK_SASL_MECHANISM", "scram-sha-256")
    monkeypatch.setenv("RERANK_SASL_USERNAME", "reranker")
    monkeypatch.setenv("RERANK_SASL_PASSWORD", "s3cret")

    worker = load_settings([]).kafka_security().aiokafka_kwargs()
    client = cli.security_from_args(parse("q", "d")).aiokafka_kwargs()

    assert client == worker
    assert client["sasl_plain_password"] == "s3cret"
