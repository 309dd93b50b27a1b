"""Worker settings: defaults, env, flags, every problem on its own line, secrets masked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from consumer import settings_doc
from consumer.service.worker_config import WorkerConfig
from consumer.settings import (
    Settings,
    SettingsError,
    build_parser,
    env_name,
    flag_name,
    load_settings,
    settings_from,
)
from kafka_common.security import KafkaSecurity

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-do-not-print"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RERANK_* setting leaks in from the developer's or CI's environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)


def problems_of(argv: list[str]) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        load_settings(argv)
    return caught.value.problems


# --- where values come from -------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings([])

    assert settings.bootstrap_servers == "127.0.0.1:9092"
    assert (settings.request_topic, settings.reply_topic, settings.dlq_topic) == (
        "rerank.requests",
        "rerank.replies",
        "rerank.requests.dlq",
    )
    assert settings.group_id == "rerank-workers"
    assert settings.model == "Qwen/Qwen3-Reranker-0.6B"
    assert settings.max_pair_tokens == 8192
    assert (settings.max_batch_tokens, settings.max_batch_pairs, settings.max_wait_ms) == (
        65536,
        512,
        2.0,
    )
    assert settings.drain_timeout_s == 30.0
    assert (settings.http_host, settings.http_port) == ("0.0.0.0", 8080)
    assert (settings.log_level, settings.log_format) == ("INFO", "text")
    assert settings.security_protocol == "PLAINTEXT"


def test_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_MAX_BATCH_TOKENS", "4096")
    monkeypatch.setenv("RERANK_REQUEST_TOPIC", "team-a.requests")

    settings = load_settings([])

    assert settings.max_batch_tokens == 4096
    assert settings.request_topic == "team-a.requests"


def test_flag_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_MAX_BATCH_TOKENS", "4096")

    settings = load_settings(["--max-batch-tokens", "8192", "--max-wait-ms=0.5"])

    assert settings.max_batch_tokens == 8192
    assert settings.max_wait_ms == 0.5


def test_empty_env_var_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_HTTP_PORT", "")
    monkeypatch.setenv("RERANK_SASL_USERNAME", "")

    settings = load_settings([])

    assert settings.http_port == Settings.model_fields["http_port"].default
    assert settings.sasl_username is None


def test_other_rerank_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The scripts export RERANK_CACHE_DIR and RERANK_VENV; they must not stop the worker.
    monkeypatch.setenv("RERANK_CACHE_DIR", "/tmp/cache")
    monkeypatch.setenv("RERANK_VENV", "/tmp/venv")

    assert load_settings([]).bootstrap_servers == "127.0.0.1:9092"


def test_words_are_normalised() -> None:
    settings = load_settings(
        ["--log-level", "debug", "--log-format", "JSON", "--compile", "true", "--packed", "no"]
    )

    assert settings.log_level == "DEBUG"
    assert settings.log_format == "json"
    assert settings.compile == "on"
    assert settings.packed == "off"


def test_settings_are_immutable() -> None:
    settings = load_settings([])
    with pytest.raises(ValueError):
        settings.max_batch_tokens = 1


def test_every_field_has_a_flag_and_help() -> None:
    parser = build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for name, info in Settings.model_fields.items():
        assert flag_name(name) in flags, name
        assert info.description, f"{name} has no description"


def test_flag_and_env_names_follow_the_field() -> None:
    assert flag_name("max_batch_tokens") == "--max-batch-tokens"
    assert env_name("max_batch_tokens") == "RERANK_MAX_BATCH_TOKENS"


def test_unknown_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings(["--max-batch-tokenz", "1"])
    assert caught.value.code == 2
    assert "--max-batch-tokenz" in capsys.readouterr().err


# --- problems: all of them, one line each -----------------------------------------------


def test_each_problem_is_one_line_naming_its_setting() -> None:
    problems = problems_of(
        [
            "--http-port",
            "70000",
            "--max-wait-ms",
            "soon",
            "--log-format",
            "xml",
            "--max-batch-tokens",
            "0",
        ]
    )

    assert len(problems) == 4
    assert all("\n" not in line for line in problems)
    by_env = {env: line for line in problems for env in _envs_in(line)}
    assert "70000" in by_env["RERANK_HTTP_PORT"]
    assert "soon" in by_env["RERANK_MAX_WAIT_MS"]
    assert "text, json" in by_env["RERANK_LOG_FORMAT"]
    assert "--max-batch-tokens" in by_env["RERANK_MAX_BATCH_TOKENS"]


def test_cross_field_problems_are_all_reported() -> None:
    problems = problems_of(
        [
            "--inflight-high-pairs",
            "100",
            "--inflight-low-pairs",
            "100",
            "--allowed-reply-topics",
            "rerank.replies(",
            "--dlq-topic",
            "rerank.requests",
        ]
    )

    assert len(problems) == 3, problems
    assert any(
        "RERANK_INFLIGHT_LOW_PAIRS" in p and "RERANK_INFLIGHT_HIGH_PAIRS" in p for p in problems
    )
    assert any("RERANK_ALLOWED_REPLY_TOPICS" in p and "regular expression" in p for p in problems)
    assert any("request topic and the dead-letter topic" in p for p in problems)


def test_field_and_cross_field_problems_come_together() -> None:
    problems = problems_of(
        [
            "--http-port",
            "-1",
            "--inflight-high-pairs",
            "10",
            "--inflight-low-pairs",
            "20",
            "--sasl-mechanism",
            "MD5",
            "--security-protocol",
            "SASL_SSL",
        ]
    )

    assert len(problems) == 3, problems
    assert any("RERANK_HTTP_PORT" in p for p in problems)
    assert any("RERANK_SASL_MECHANISM" in p and "MD5" in p for p in problems)
    assert any("RERANK_INFLIGHT_LOW_PAIRS" in p for p in problems)
    # No second line about the mechanism from the security check of a stand-in value.
    assert not any(p.startswith("Kafka security") for p in problems)


def test_reply_pattern_must_allow_the_reply_topic() -> None:
    (problem,) = problems_of(["--allowed-reply-topics", r"team-a\..+"])

    assert "RERANK_ALLOWED_REPLY_TOPICS" in problem
    assert "rerank.replies" in problem


def test_sasl_without_credentials_lists_each_missing_part() -> None:
    problems = problems_of(["--security-protocol", "SASL_SSL"])

    assert len(problems) == 2
    assert any("mechanism" in p for p in problems)
    assert any("username and password" in p for p in problems)


def test_missing_tls_files_are_reported() -> None:
    (problem,) = problems_of(["--security-protocol", "SSL", "--ssl-cafile", "/no/such/ca.pem"])

    assert "RERANK_SSL_CAFILE" in problem
    assert "/no/such/ca.pem" in problem


def test_a_bad_secret_is_reported_without_its_value() -> None:
    # A list where a string belongs: pydantic's own message would echo the input.
    with pytest.raises(SettingsError) as caught:
        settings_from({"sasl_password": [SECRET]})

    (problem,) = caught.value.problems
    assert "RERANK_SASL_PASSWORD" in problem
    assert SECRET not in problem


# --- secrets -----------------------------------------------------------------------------


def sasl_settings() -> Settings:
    return load_settings(
        [
            "--security-protocol",
            "SASL_SSL",
            "--sasl-mechanism",
            "SCRAM-SHA-512",
            "--sasl-username",
            "worker",
            "--sasl-password",
            SECRET,
            "--ssl-password",
            SECRET,
        ]
    )


def test_secrets_are_masked_in_repr_str_and_log_view() -> None:
    settings = sasl_settings()

    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    masked = settings.masked()
    assert masked["sasl_password"] == "**********"
    assert masked["ssl_password"] == "**********"
    assert SECRET not in str(masked)
    assert masked["sasl_username"] == "worker"


def test_secrets_reach_the_kafka_security() -> None:
    security = sasl_settings().kafka_security()

    assert isinstance(security, KafkaSecurity)
    assert security.protocol == "SASL_SSL"
    assert security.sasl_mechanism == "SCRAM-SHA-512"
    assert isinstance(security.sasl_password, SecretStr)
    assert security.sasl_password.get_secret_value() == SECRET
    assert SECRET not in repr(security)


def test_secrets_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("RERANK_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("RERANK_SASL_USERNAME", "worker")
    monkeypatch.setenv("RERANK_SASL_PASSWORD", SECRET)

    settings = load_settings([])

    assert settings.kafka_security().aiokafka_kwargs()["sasl_plain_password"] == SECRET
    assert SECRET not in repr(settings)


# --- mapping onto the other modules' option objects --------------------------------------


def test_worker_config_carries_the_settings() -> None:
    settings = load_settings(
        [
            "--request-topic",
            "a.requests",
            "--reply-topic",
            "a.replies",
            "--dlq-topic",
            "a.dlq",
            "--client-id",
            "w1",
            "--max-documents",
            "7",
            "--max-query-chars",
            "0",
            "--inflight-high-pairs",
            "64",
            "--inflight-low-pairs",
            "16",
            "--drain-timeout-s",
            "3",
        ]
    )

    config = settings.worker_config()

    assert isinstance(config, WorkerConfig)
    assert (config.request_topic, config.reply_topic, config.dlq_topic) == (
        "a.requests",
        "a.replies",
        "a.dlq",
    )
    assert config.client_id == "w1"
    assert config.limits.max_documents == 7
    assert config.limits.max_query_chars is None  # 0 = no limit
    assert (config.inflight_high_pairs, config.inflight_low_pairs) == (64, 16)
    assert config.drain_timeout_s == 3
    assert config.allowed_reply_pattern.fullmatch("a.replies.team-b")
    assert not config.allowed_reply_pattern.fullmatch("rerank.requests")


def test_client_id_defaults_to_the_host() -> None:
    assert load_settings([]).worker_config().client_id.startswith("rerank-worker-")


def test_layer_path_reaches_the_model_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_LAYERS", " FP8 ")
    assert load_settings([]).model_options().layers == "fp8"
    assert load_settings(["--layers", "fp8-normed"]).model_options().layers == "fp8-normed"
    with pytest.raises(SettingsError, match="layers"):
        load_settings(["--layers", "int4"])


def test_graph_size_reaches_the_model_options(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        load_settings(["--cuda-graph-max-tokens", "16384"]).model_options().cuda_graph_max_tokens
        == 16384
    )
    monkeypatch.setenv("RERANK_CUDA_GRAPH_MAX_TOKENS", "12288")
    assert load_settings([]).model_options().cuda_graph_max_tokens == 12288
    with pytest.raises(
        SettingsError,
        match=r"cuda-graph-max-tokens\): input should be greater than or equal to 512",
    ):
        load_settings(["--cuda-graph-max-tokens", "100"])


def test_layer_setting_offers_exactly_the_packed_paths_layer_paths() -> None:
    from typing import get_args

    from consumer.runtime.qwen3.forward import LAYER_PATHS
    from consumer.settings import Layers

    assert get_args(Layers) == ("auto", *LAYER_PATHS)


def test_model_options_and_engine_settings_carry_the_settings() -> None:
    settings = load_settings(
        ["--model", "/models/x", "--device", "CPU", "--dtype", "float32", "--max-batch-pairs", "9"]
    )

    options = settings.model_options()
    engine = settings.engine_settings()

    assert (options.model, options.device, options.dtype) == ("/models/x", "cpu", "float32")
    assert engine.max_batch_pairs == 9
    assert engine.max_batch_tokens == settings.max_batch_tokens


# --- the command line and the docs -------------------------------------------------------


def test_help_lists_every_env_var_and_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("RERANK_")},
        check=False,
    )

    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    for name in Settings.model_fields:
        assert env_name(name) in help_text, name
        assert flag_name(name) in help_text, name
    assert "default: 65536" in help_text
    assert "default: rerank.requests.dlq" in help_text


def test_docs_settings_table_is_up_to_date() -> None:
    written = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert written == settings_doc.render(), (
        "docs/settings.md is stale: python -m consumer.settings_doc > docs/settings.md"
    )


def test_docs_settings_table_lists_every_setting() -> None:
    rendered = settings_doc.render()
    for name in Settings.model_fields:
        assert f"`{env_name(name)}`" in rendered, name


def _envs_in(line: str) -> list[str]:
    return [word for word in line.replace("(", " ").split() if word.startswith("RERANK_")]
