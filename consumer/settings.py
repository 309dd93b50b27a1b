"""The worker's settings: environment variables (``RERANK_*``) and command-line flags.

Every setting is a field of :class:`Settings`; the command line is generated from the
fields (``max_batch_tokens`` <-> ``--max-batch-tokens`` <-> ``RERANK_MAX_BATCH_TOKENS``).
A flag beats its environment variable, which beats the default.

:func:`load_settings` reports *every* problem at once, one line each, as a
:class:`SettingsError`, so that a bad deployment is fixed in one round trip.
Secrets are :class:`pydantic.SecretStr`: ``repr``, ``str`` and :meth:`Settings.masked`
never show them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.engine.settings import EngineSettings
from consumer.runtime.options import ModelOptions
from consumer.service.codec import RequestLimits
from consumer.service.worker_config import Problem, WorkerConfig, cross_field_problems
from kafka_common.security import PROTOCOLS, SASL_MECHANISMS, KafkaSecurity

ENV_PREFIX = "RERANK_"

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Switch = Literal["auto", "on", "off"]
Delivery = Literal["at_least_once", "exactly_once"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["text", "json"]
Tracing = Literal["off", "otlp"]
Layers = Literal["auto", "compiled", "kernels", "fp8", "fp8-normed"]
TokenizerBackend = Literal["auto", "tiktoken", "huggingface"]

_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_DTYPES = ("auto", "bfloat16", "float16", "float32")
_SWITCH_WORDS = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}

# Field groups, in the order --help and the settings table show them.
GROUPS = (
    "Kafka",
    "Kafka tuning",
    "Kafka security",
    "Model",
    "Batching and back-pressure",
    "Request limits",
    "Service",
)


def _setting(default: Any, description: str, group: str, **constraints: Any) -> Any:
    """A field of the settings surface alone (the process's own: HTTP, logs, tracing)."""
    assert group in GROUPS, group
    return Field(
        default, description=description, json_schema_extra={"group": group}, **constraints
    )


def _layer_setting(layer: type, name: str, description: str, group: str) -> Any:
    """A setting that ``layer``'s field ``name`` declares: its default comes from there,
    and so do its checks (they run when the settings build the layer objects)."""
    return _setting(_default_of(layer, name), description, group)


def _default_of(layer: type, name: str) -> Any:
    pydantic_fields = getattr(layer, "__pydantic_fields__", None)
    if pydantic_fields is not None:
        return pydantic_fields[name].get_default(call_default_factory=True)
    (field,) = (f for f in dataclasses.fields(layer) if f.name == name)
    return field.default


_SECURITY_FIELDS = (
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
)


class SettingsError(Exception):
    """The settings cannot work; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class _CrossFieldProblems(ValueError):
    """Raised by the model validator; carries its problems through pydantic."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(problem.text(_env) for problem in problems))
        self.problems = problems


class _UncheckedSecurity(KafkaSecurity):
    """A :class:`KafkaSecurity` that does not raise on construction.

    Lets the settings collect *all* of its problems instead of the first one.
    """

    def __post_init__(self) -> None:
        pass


class Settings(BaseSettings):
    """Every setting of one rerank worker process (immutable)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        # An empty variable (``RERANK_X=`` from a compose ``${X:-}``) means "not set".
        env_ignore_empty=True,
        validate_default=True,
    )

    # Kafka
    bootstrap_servers: str = _layer_setting(
        WorkerConfig,
        "bootstrap_servers",
        "Kafka bootstrap servers, comma separated host:port.",
        "Kafka",
    )
    request_topic: str = _layer_setting(
        WorkerConfig,
        "request_topic",
        "Topic the worker consumes rerank requests from.",
        "Kafka",
    )
    reply_topic: str = _layer_setting(
        WorkerConfig,
        "reply_topic",
        "Default reply topic (when a request has no reply-topic header).",
        "Kafka",
    )
    dlq_topic: str = _layer_setting(
        WorkerConfig,
        "dlq_topic",
        "Dead-letter topic for records that cannot be answered.",
        "Kafka",
    )
    group_id: str = _layer_setting(
        WorkerConfig,
        "group_id",
        "Consumer group shared by all workers.",
        "Kafka",
    )
    client_id: str | None = _setting(
        None, "Kafka client id; unset means rerank-worker-HOSTNAME.", "Kafka"
    )
    allowed_reply_topics: str | None = _layer_setting(
        WorkerConfig,
        "allowed_reply_topics",
        "Regular expression (full match) of the reply topics a request may name; unset "
        "means the reply topic and every topic named REPLY_TOPIC.SUFFIX "
        "(rerank.replies.team-a). Other reply topics get a dead-letter record.",
        "Kafka",
    )
    reply_topic_wait_s: float = _layer_setting(
        WorkerConfig,
        "reply_topic_wait_s",
        "Longest wait for a requested reply topic's metadata; a lookup that fails or "
        "times out is no verdict and is tried again.",
        "Kafka",
    )
    delivery: Delivery = _layer_setting(
        WorkerConfig,
        "delivery",
        "at_least_once: replies are produced as requests are answered; a crash can repeat "
        "some (the SDK drops duplicates). exactly_once: each partition's replies and "
        "offsets commit in one Kafka transaction; read_committed readers see each reply "
        "once, up to commit_interval_s later.",
        "Kafka",
    )
    transactional_id_prefix: str = _layer_setting(
        WorkerConfig,
        "transactional_id_prefix",
        "exactly_once: the start of each partition's transactional id (one per deployment "
        "sharing a Kafka cluster).",
        "Kafka",
    )
    reply_timeout_s: float = _layer_setting(
        WorkerConfig,
        "reply_timeout_s",
        "A reply that keeps failing (broker away, topic lookups timing out) is retried "
        "this long, or until the request's deadline, then the request is dead-lettered.",
        "Kafka",
    )
    group_instance_id: str | None = _layer_setting(
        WorkerConfig,
        "group_instance_id",
        "Static group membership: a stable id per worker (the GPU index, a StatefulSet "
        "pod name). A worker back under the same id within the session timeout keeps its "
        "partitions: a rolling restart moves none. Unset: dynamic membership.",
        "Kafka",
    )
    connect_timeout_s: float = _layer_setting(
        WorkerConfig,
        "connect_timeout_s",
        "At start, how long to keep trying to reach the brokers (not ready meanwhile); "
        "0 keeps trying for as long as the worker runs. A refused login fails at once.",
        "Kafka",
    )

    # Kafka tuning
    session_timeout_ms: int = _layer_setting(
        WorkerConfig,
        "session_timeout_ms",
        "Consumer group session timeout.",
        "Kafka tuning",
    )
    heartbeat_interval_ms: int = _layer_setting(
        WorkerConfig,
        "heartbeat_interval_ms",
        "Consumer group heartbeat interval.",
        "Kafka tuning",
    )
    max_poll_interval_ms: int = _layer_setting(
        WorkerConfig,
        "max_poll_interval_ms",
        "Longest time between polls before the group evicts the worker.",
        "Kafka tuning",
    )
    rebalance_timeout_ms: int = _layer_setting(
        WorkerConfig,
        "rebalance_timeout_ms",
        "How long the group waits for members to finish their revoke handlers; must "
        "cover revoke_timeout_s plus the commit after it.",
        "Kafka tuning",
    )
    max_poll_records: int = _layer_setting(
        WorkerConfig,
        "max_poll_records",
        "Most records taken from the consumer per poll.",
        "Kafka tuning",
    )
    producer_linger_ms: int = _layer_setting(
        WorkerConfig,
        "producer_linger_ms",
        "How long the producer waits to batch replies (0: at once; replies still batch "
        "while a send is in flight).",
        "Kafka tuning",
    )
    commit_interval_s: float = _layer_setting(
        WorkerConfig,
        "commit_interval_s",
        "A finished request's offset is committed within this long (never more often): "
        "few answered requests are left uncommitted when a worker is killed.",
        "Kafka tuning",
    )
    max_uncommitted_records: int = _layer_setting(
        WorkerConfig,
        "max_uncommitted_records",
        "A partition with this many records waiting behind an unfinished one stops "
        "fetching until it clears (bounded memory).",
        "Kafka tuning",
    )
    max_record_attempts: int = _layer_setting(
        WorkerConfig,
        "max_record_attempts",
        "A record started this many times without being finished (its worker died or "
        "left mid-record each time) is dead-lettered as poison_record, not processed again.",
        "Kafka tuning",
    )
    revoke_timeout_s: float = _layer_setting(
        WorkerConfig,
        "revoke_timeout_s",
        "On a rebalance, how long revoked partitions' in-flight requests may take to finish "
        "before the partitions are let go (the rest is redelivered).",
        "Kafka tuning",
    )
    missing_topic_ttl_s: float = _layer_setting(
        WorkerConfig,
        "missing_topic_ttl_s",
        "How long a missing reply topic is remembered as missing.",
        "Kafka tuning",
    )
    max_outbox_bytes: int = _layer_setting(
        WorkerConfig,
        "max_outbox_bytes",
        "exactly_once: most bytes of answers waiting for their partitions' transactions; "
        "above it every partition stops fetching until commits drain them.",
        "Kafka tuning",
    )
    transactions_unready_after_s: float = _layer_setting(
        WorkerConfig,
        "transactions_unready_after_s",
        "exactly_once: a partition whose transactions have failed this long (seconds) makes "
        "the worker not ready.",
        "Kafka tuning",
    )
    transactions_give_up_after_s: float = _layer_setting(
        WorkerConfig,
        "transactions_give_up_after_s",
        "exactly_once: ... and this long makes the worker stop (exit 1, one line): only an "
        "operator can make its waiting answers committable.",
        "Kafka tuning",
    )
    lag_interval_s: float = _layer_setting(
        WorkerConfig,
        "lag_interval_s",
        "How often the consumer-lag metric is refreshed.",
        "Kafka tuning",
    )

    # Kafka security
    security_protocol: SecurityProtocol = _layer_setting(
        KafkaSecurity,
        "protocol",
        f"Kafka security protocol: {', '.join(PROTOCOLS)}.",
        "Kafka security",
    )
    sasl_mechanism: SaslMechanism | None = _layer_setting(
        KafkaSecurity,
        "sasl_mechanism",
        f"SASL mechanism ({', '.join(SASL_MECHANISMS)}); needed with SASL_* protocols.",
        "Kafka security",
    )
    sasl_username: str | None = _layer_setting(
        KafkaSecurity,
        "sasl_username",
        "SASL user name.",
        "Kafka security",
    )
    sasl_password: SecretStr | None = _layer_setting(
        KafkaSecurity,
        "sasl_password",
        "SASL password (secret; prefer the environment variable, flags show in ps).",
        "Kafka security",
    )
    ssl_cafile: str | None = _layer_setting(
        KafkaSecurity,
        "ssl_cafile",
        "CA bundle (PEM) to verify the brokers; unset means the system CAs.",
        "Kafka security",
    )
    ssl_certfile: str | None = _layer_setting(
        KafkaSecurity,
        "ssl_certfile",
        "Client certificate (PEM) for mutual TLS.",
        "Kafka security",
    )
    ssl_keyfile: str | None = _layer_setting(
        KafkaSecurity,
        "ssl_keyfile",
        "Client private key (PEM) for mutual TLS.",
        "Kafka security",
    )
    ssl_password: SecretStr | None = _layer_setting(
        KafkaSecurity,
        "ssl_password",
        "Password of the client private key (secret; prefer the environment variable).",
        "Kafka security",
    )

    # Model
    model: str = _layer_setting(
        ModelOptions,
        "model",
        "Model: a local folder or a Hugging Face model id "
        "(sentence-transformers/all-MiniLM-L6-v2 works offline with the demo extra installed).",
        "Model",
    )
    model_name: str | None = _layer_setting(
        ModelOptions,
        "model_name",
        "The model's name in replies. Unset: the hub id, or the model folder's last part "
        "(never a path).",
        "Model",
    )
    device: str = _layer_setting(
        ModelOptions,
        "device",
        "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.",
        "Model",
    )
    dtype: str = _layer_setting(
        ModelOptions,
        "dtype",
        f"Weights dtype: {', '.join(_DTYPES)} (auto: bfloat16 on cuda, float32 on cpu).",
        "Model",
    )
    attn_implementation: str = _layer_setting(
        ModelOptions,
        "attn_implementation",
        "Attention implementation passed to transformers (auto: sdpa).",
        "Model",
    )
    max_pair_tokens: int = _layer_setting(
        ModelOptions,
        "max_pair_tokens",
        "Most tokens of one (query, document) prompt; longer documents are truncated. "
        "Capped by the model's max_position_embeddings.",
        "Model",
    )
    compile: Switch = _layer_setting(
        ModelOptions,
        "compile",
        "torch.compile the model: auto (on for cuda), on, off.",
        "Model",
    )
    packed: Switch = _layer_setting(
        ModelOptions,
        "packed",
        "Padding-free packed batches with varlen attention: auto (on for cuda when "
        "available), on, off.",
        "Model",
    )
    cuda_graphs: Switch = _layer_setting(
        ModelOptions,
        "cuda_graphs",
        "Replay small packed batches (up to cuda_graph_max_tokens) from captured CUDA "
        "graphs: auto or on (whenever the packed path runs), off. Cuts a lone request's "
        "latency; costs a few seconds at start and some GPU memory.",
        "Model",
    )
    cuda_graph_max_tokens: int = _layer_setting(
        ModelOptions,
        "cuda_graph_max_tokens",
        "The largest batch, in stream tokens, replayed from a CUDA graph (buckets of 256-512 "
        "tokens up to 8,192, then of 1,024). A larger batch issues its layers from Python. "
        "More graphs cost warm-up time and GPU memory; quick batches are cut to this size.",
        "Model",
    )
    layers: Layers = _layer_setting(
        ModelOptions,
        "layers",
        "How the packed path runs each decoder layer: auto or compiled (torch.compile "
        "regions), kernels (fused Triton row kernels around bf16 GEMMs), fp8 (the same "
        "with FP8 linear layers; compute capability 8.9 or newer; 1.3-1.6x faster on an "
        "H200 but scores drift about 10x further from fp32 than bf16: see "
        "docs/benchmarks.md), fp8-normed (FP8 for q/k/v and gate/up only). All but auto "
        "and compiled turn the packed path on.",
        "Model",
    )
    fp8_bf16_last_layers: int = _layer_setting(
        ModelOptions,
        "fp8_bf16_last_layers",
        "With layers=fp8 or fp8-normed: how many of the last decoder layers keep bf16 "
        "linear layers (the embeddings, norms and the yes/no head always do), as the "
        "published W8A8 build of Qwen3-Reranker-4B does with 4 (docs/engine.md).",
        "Model",
    )
    split_long_documents: bool = _layer_setting(
        EngineSettings,
        "split_long_documents",
        "A document longer than max_pair_tokens allows is scored as overlapping windows "
        "that fit, taking its best window's score (the reply's result says which window), "
        "instead of being truncated; a request's split_long_documents overrides this.",
        "Model",
    )
    window_overlap_tokens: int = _layer_setting(
        EngineSettings,
        "window_overlap_tokens",
        "Tokens each window of a split document shares with the next (at most half a window).",
        "Model",
    )
    max_windows_per_document: int = _layer_setting(
        EngineSettings,
        "max_windows_per_document",
        "Most windows a split document is scored in; what is left after them is truncated.",
        "Model",
    )
    tokenizer_backend: TokenizerBackend = _layer_setting(
        ModelOptions,
        "tokenizer_backend",
        "How Qwen3 prompts are tokenized: auto (tiktoken when it gives the model "
        "tokenizer's exact ids, checked at start, else the model's own tokenizer), "
        "tiktoken (refuse to start otherwise), huggingface (the model's own Rust "
        "tokenizer). The ids are the same; tiktoken tokenized a lone 8-document request in "
        "1.1 ms against 2.6 on a 16-core host (docs/benchmarks.md).",
        "Model",
    )
    default_instruction: str = _layer_setting(
        ModelOptions,
        "default_instruction",
        "Instruction used when a request gives none.",
        "Model",
    )

    # Batching and back-pressure
    max_batch_tokens: int = _layer_setting(
        EngineSettings,
        "max_batch_tokens",
        "Token budget of one batch (padded cost: longest pair x pairs).",
        "Batching and back-pressure",
    )
    max_batch_pairs: int = _layer_setting(
        EngineSettings,
        "max_batch_pairs",
        "Most pairs in one batch.",
        "Batching and back-pressure",
    )
    max_wait_ms: float = _layer_setting(
        EngineSettings,
        "max_wait_ms",
        "How long an idle device waits for requests still being tokenized before running "
        "a small batch (a lone request does not wait).",
        "Batching and back-pressure",
    )
    quick_batch_backlog: float = _layer_setting(
        EngineSettings,
        "quick_batch_backlog",
        "While fewer than this many quick batches' worth of tokens wait, batches are cut no "
        "bigger than the largest CUDA graph (cuda_graph_max_tokens), which is cheap to issue; a "
        "larger backlog gets max_batch_tokens for throughput. 0: always max_batch_tokens.",
        "Batching and back-pressure",
    )
    late_cut: bool = _layer_setting(
        EngineSettings,
        "late_cut",
        "With the device busy, cut the next batch only when the device is due to need it "
        "(predicted from the batches measured so far), so it takes every request that waits "
        "by then instead of committing early to the first one. false: cut it as soon as the "
        "slot ahead of the device is free.",
        "Batching and back-pressure",
    )
    late_cut_margin_ms: float = _layer_setting(
        EngineSettings,
        "late_cut_margin_ms",
        "How much earlier than predicted (beyond the measured time to prepare and launch a "
        "batch) a late cut is made, so the device does not wait for the batch.",
        "Batching and back-pressure",
    )
    min_batch_tokens: int = _layer_setting(
        EngineSettings,
        "min_batch_tokens",
        "After running out of device memory the token budget shrinks, never below this.",
        "Batching and back-pressure",
    )
    tokenizer_threads: int = _layer_setting(
        EngineSettings,
        "tokenizer_threads",
        "Threads that tokenize requests (the Rust tokenizer releases the GIL; "
        "docs/benchmarks.md shows how many keep one GPU fed).",
        "Batching and back-pressure",
    )
    inflight_high_pairs: int = _layer_setting(
        WorkerConfig,
        "inflight_high_pairs",
        "Pause every assigned partition when more (query, document) pairs than this are "
        "accepted and not yet answered (Kafka is the buffer).",
        "Batching and back-pressure",
    )
    inflight_low_pairs: int = _layer_setting(
        WorkerConfig,
        "inflight_low_pairs",
        "Resume the partitions once in-flight pairs fall to this or below.",
        "Batching and back-pressure",
    )
    inflight_target_s: float = _layer_setting(
        WorkerConfig,
        "inflight_target_s",
        "When above 0, the high mark follows the measured rate: the pairs this worker "
        "answers in this many seconds, at most inflight_high_pairs and at least "
        "inflight_min_pairs (the low mark keeps its ratio). A slow model then holds seconds "
        "of work, not a fixed count; what waits in Kafka is taken oldest first, and the "
        "tail under overload still grows a little (docs/worker.md). 0: fixed marks.",
        "Batching and back-pressure",
    )
    inflight_min_pairs: int = _layer_setting(
        WorkerConfig,
        "inflight_min_pairs",
        "The smallest high mark, and the high mark until a rate is measured.",
        "Batching and back-pressure",
    )
    engine_stall_timeout_s: float = _layer_setting(
        EngineSettings,
        "engine_stall_timeout_s",
        "With work outstanding, the model must finish a batch at least this often; "
        "otherwise the engine has failed and the worker steps aside (exit 1).",
        "Batching and back-pressure",
    )

    # Request limits
    max_documents: int = _layer_setting(
        RequestLimits,
        "max_documents",
        "Most documents in one request.",
        "Request limits",
    )
    max_request_bytes: int = _layer_setting(
        RequestLimits,
        "max_request_bytes",
        "Largest request record value, in bytes.",
        "Request limits",
    )
    max_query_chars: int | None = _layer_setting(
        RequestLimits,
        "max_query_chars",
        "Longest query, in characters; 0 means no limit.",
        "Request limits",
    )
    max_instruction_chars: int | None = _layer_setting(
        RequestLimits,
        "max_instruction_chars",
        "Longest instruction, in characters; 0 means no limit.",
        "Request limits",
    )
    max_document_chars: int | None = _layer_setting(
        RequestLimits,
        "max_document_chars",
        "Longest document, in characters; 0 means no limit (long documents are truncated "
        "to max_pair_tokens anyway).",
        "Request limits",
    )
    default_max_age_s: float = _layer_setting(
        WorkerConfig,
        "default_max_age_s",
        "A request without a deadline-ms header expires this long after its record "
        "timestamp; 0 means never (producer clocks set CreateTime and may be skewed).",
        "Request limits",
    )

    # Service
    drain_timeout_s: float = _layer_setting(
        WorkerConfig,
        "drain_timeout_s",
        "On SIGTERM, how long to finish in-flight requests before leaving the group.",
        "Service",
    )
    http_host: str = _setting(
        "0.0.0.0",
        "Address of the HTTP side-port (/health/live, /health/ready, /metrics).",
        "Service",
        min_length=1,
    )
    http_port: int = _setting(
        8080, "Port of the HTTP side-port (0: any free port).", "Service", ge=0, le=65535
    )
    log_level: LogLevel = _setting(
        "INFO", "Log level: DEBUG, INFO, WARNING, ERROR, CRITICAL.", "Service"
    )
    log_format: LogFormat = _setting(
        "text", "Log format: text or json (one object a line).", "Service"
    )
    tracing: Tracing = _setting(
        "off",
        "OpenTelemetry traces of each request: off, or otlp (exported to the collector the "
        "standard OTEL_EXPORTER_OTLP_* variables name; needs the tracing extra). The "
        "requests' W3C traceparent headers make the worker's spans children of the "
        "producer's.",
        "Service",
    )
    gc_freeze: bool = _setting(
        True,
        "After the warm-up, put every object alive then (model, tokenizer, libraries) out of "
        "the garbage collector's reach: its full collections then no longer pause the "
        "worker for about half a second under load.",
        "Service",
    )

    @field_validator("compile", "packed", "cuda_graphs", mode="before")
    @classmethod
    def _switch_words(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            lowered = value.strip().lower()
            return _SWITCH_WORDS.get(lowered, lowered)
        return value

    @field_validator("log_level", "security_protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator(
        "log_format", "dtype", "device", "tracing", "layers", "tokenizer_backend", mode="before"
    )
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("max_query_chars", "max_instruction_chars", "max_document_chars")
    @classmethod
    def _zero_is_no_limit(cls, limit: int | None) -> int | None:
        return None if limit == 0 else limit

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.fullmatch(value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in _DTYPES:
            raise ValueError(f"must be one of {', '.join(_DTYPES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems = self._problems()
        if problems:
            raise _CrossFieldProblems(problems)
        return self

    def _problems(self) -> list[Problem]:
        """What the layer objects refuse in these settings, and the security settings'
        problems: the checks live there, each once."""
        values = dict(self)
        found: list[Problem] = []
        limits = _built(RequestLimits, values, found) or RequestLimits()
        _built(EngineSettings, values, found)
        _built(ModelOptions, values, found)
        worker = {"limits": limits, "client_id": self.effective_client_id}
        _built(WorkerConfig, values | worker, found)
        found.extend(cross_field_problems(values))
        return found + self._security_problems()

    def _security_problems(self) -> list[Problem]:
        found = [
            Problem(_SECURITY_FIELDS, "Kafka security: " + _escaped(problem))
            for problem in self._unchecked_security().problems()
        ]
        return found + self._missing_files()

    def _missing_files(self) -> list[Problem]:
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            return []
        return [
            Problem((name,), "{}: no such file: " + _escaped(path))
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
            if (path := getattr(self, name)) is not None and not os.path.isfile(path)
        ]

    def _security_fields(self) -> dict[str, Any]:
        return {
            "protocol": self.security_protocol,
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_username": self.sasl_username,
            "sasl_password": self.sasl_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_password": self.ssl_password,
        }

    def _unchecked_security(self) -> KafkaSecurity:
        return _UncheckedSecurity(**self._security_fields())

    # --- derived values -----------------------------------------------------------------

    @property
    def effective_client_id(self) -> str:
        """The Kafka client id: the setting, else ``rerank-worker-HOSTNAME``."""
        return self.client_id or f"rerank-worker-{socket.gethostname()}"

    def kafka_security(self) -> KafkaSecurity:
        """The Kafka connection security built from the ``security_*``/``sasl_*``/``ssl_*``."""
        return KafkaSecurity(**self._security_fields())

    def masked(self) -> dict[str, Any]:
        """Every setting as plain values, secrets shown as ``**********`` (for logs)."""
        values: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            values[name] = "**********" if isinstance(value, SecretStr) else value
        return values

    # --- the other modules' option objects ------------------------------------------------

    def model_options(self) -> ModelOptions:
        return ModelOptions(**_fields_of(ModelOptions, dict(self)))

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(**_fields_of(EngineSettings, dict(self)))

    def worker_config(self) -> WorkerConfig:
        values = dict(self) | {
            "client_id": self.effective_client_id,
            "security": self.kafka_security(),
            "limits": RequestLimits(**_fields_of(RequestLimits, dict(self))),
        }
        return WorkerConfig(**_fields_of(WorkerConfig, values))


def _fields_of(layer: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``layer``'s fields, copied by name (the layer's defaults fill the
    rest)."""
    return {f.name: values[f.name] for f in dataclasses.fields(layer) if f.name in values}


def _built(layer: type, values: Mapping[str, Any], found: list[Problem]) -> Any:
    """``layer`` built from ``values``, or None with its field problems added to ``found``
    (its problems between fields are :func:`cross_field_problems`' to report)."""
    try:
        return layer(**_fields_of(layer, values))
    except ValidationError as exc:
        found.extend(
            Problem((str(error["loc"][0]),), "{}: " + _escaped(_field_message(error)))
            for error in exc.errors()
            if error.get("loc")  # an error of no field: between fields, reported once
        )
        return None


def _escaped(text: str) -> str:
    """``text`` for a :class:`Problem` template (whose ``{}`` are the setting names)."""
    return text.replace("{", "{{").replace("}", "}}")


# --- environment variable / flag names ----------------------------------------------------


def env_name(field: str) -> str:
    """The environment variable of a settings field: ``max_wait_ms`` -> ``RERANK_MAX_WAIT_MS``."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """The command-line flag of a settings field: ``max_wait_ms`` -> ``--max-wait-ms``."""
    return "--" + field.replace("_", "-")


def _env(field: str) -> str:
    return f"{env_name(field)} ({flag_name(field)})"


def is_secret(info: FieldInfo) -> bool:
    """Whether a field holds a secret (never printed)."""
    return SecretStr in (info.annotation, *get_args(info.annotation))


def field_group(info: FieldInfo) -> str:
    """The --help/docs group of a field."""
    extra = info.json_schema_extra
    assert isinstance(extra, dict)
    group = extra["group"]
    assert isinstance(group, str)
    return group


def choices(info: FieldInfo) -> tuple[str, ...] | None:
    """The allowed values of a Literal field (``None`` for free-form fields)."""
    for candidate in (info.annotation, *get_args(info.annotation)):
        if get_origin(candidate) is Literal:
            return tuple(str(value) for value in get_args(candidate))
    return None


def default_text(info: FieldInfo) -> str:
    """The default of a field as shown in --help and docs."""
    return "(unset)" if info.default is None else str(info.default)


# --- command line -----------------------------------------------------------------------


def build_parser(prog: str = "rerank-consumer") -> argparse.ArgumentParser:
    """An argparse parser with one flag per settings field (grouped, documented)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Kafka rerank worker. Every setting is a flag and an environment variable; "
            "a flag beats its environment variable, which beats the default."
        ),
        usage="%(prog)s [options]",
        argument_default=argparse.SUPPRESS,
    )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for name, info in Settings.model_fields.items():
        help_text = _help_text(name, info).replace("%", "%%")
        group = groups[field_group(info)]
        group.add_argument(flag_name(name), dest=name, metavar=_metavar(info), help=help_text)
    return parser


def _help_text(name: str, info: FieldInfo) -> str:
    default = "(secret)" if is_secret(info) and info.default is not None else default_text(info)
    return f"{info.description} [env {env_name(name)}; default: {default}]"


def _metavar(info: FieldInfo) -> str:
    allowed = choices(info)
    if allowed is not None:
        return "{" + ",".join(allowed) + "}"
    kinds = {int, float}.intersection((info.annotation, *get_args(info.annotation)))
    if kinds:
        return "N"
    return "TEXT"


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from flags (``argv``; ``None`` means ``sys.argv[1:]``), env and defaults.

    Raises :class:`SettingsError` with every problem found, one line each. ``--help``
    and unknown flags are argparse's business (``SystemExit``).
    """
    flags = vars(build_parser().parse_args(argv))
    return settings_from(flags)


def settings_from(values: Mapping[str, Any]) -> Settings:
    """Build :class:`Settings` from explicit values (over env and defaults).

    Raises :class:`SettingsError` with every problem: the fields that fail on their own
    and, among the others, every problem the layer objects find.
    """
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems, failed = _problem_lines(exc)
        if failed:
            problems.extend(_layer_problems_without(values, failed))
        raise SettingsError(problems) from None


def _layer_problems_without(values: Mapping[str, Any], failed: frozenset[str]) -> list[str]:
    """The layer objects' problems with the ``failed`` fields at their defaults, but for
    those that involve a failed field (they would be about the stand-in, not the user's
    value)."""
    stand_ins = {name: Settings.model_fields[name].default for name in failed}
    try:
        Settings(**{**values, **stand_ins})
    except ValidationError as exc:
        return [
            problem.text(_env)
            for error in exc.errors()
            if isinstance(cause := error.get("ctx", {}).get("error"), _CrossFieldProblems)
            for problem in cause.problems
            if failed.isdisjoint(problem.fields)
        ]
    return []


def _problem_lines(exc: ValidationError) -> tuple[list[str], frozenset[str]]:
    """One line per problem, and the fields that failed their own parsing."""
    lines: list[str] = []
    failed: set[str] = set()
    for error in exc.errors():
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _CrossFieldProblems):
            lines.extend(problem.text(_env) for problem in cause.problems)
            continue
        lines.append(_field_problem(error))
        if error.get("loc"):
            failed.add(str(error["loc"][0]))
    return lines, frozenset(failed)


def _field_problem(error: Any) -> str:
    loc = error.get("loc", ())
    field = str(loc[0]) if loc else ""
    info = Settings.model_fields.get(field)
    message = _field_message(error)
    if info is None:
        return f"unknown setting {field!r}: {message}" if field else message
    return f"{_env(field)}: {message}"


def _field_message(error: Any) -> str:
    """A field error's message, with the value it refused unless that is a secret."""
    field = str(error["loc"][0]) if error.get("loc") else ""
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    info = Settings.model_fields.get(field)
    if info is None:
        return message
    if error.get("type") == "literal_error" and (allowed := choices(info)) is not None:
        message = f"must be one of {', '.join(allowed)}"
    if is_secret(info):
        return message
    return f"{message} (got {error.get('input')!r})"
