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
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.runtime.options import DEFAULT_INSTRUCTION
from producer_sdk.security import PROTOCOLS, SASL_MECHANISMS, KafkaSecurity

if TYPE_CHECKING:
    from consumer.engine.settings import EngineSettings
    from consumer.runtime.options import ModelOptions
    from consumer.service.worker_config import WorkerConfig

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
    """A settings field with its description and its --help/docs group."""
    assert group in GROUPS, group
    return Field(
        default, description=description, json_schema_extra={"group": group}, **constraints
    )


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
# Fields whose own validation failed, while settings_from looks for the other problems.
_SKIP_CHECKS_OF: ContextVar[frozenset[str]] = ContextVar("skip_checks_of", default=frozenset())


class SettingsError(Exception):
    """The settings cannot work; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class _CrossFieldProblems(ValueError):
    """Raised by the model validator; carries its problems through pydantic."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
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
    bootstrap_servers: str = _setting(
        "127.0.0.1:9092",
        "Kafka bootstrap servers, comma separated host:port.",
        "Kafka",
        min_length=1,
    )
    request_topic: str = _setting(
        "rerank.requests",
        "Topic the worker consumes rerank requests from.",
        "Kafka",
        min_length=1,
    )
    reply_topic: str = _setting(
        "rerank.replies",
        "Default reply topic (when a request has no reply-topic header).",
        "Kafka",
        min_length=1,
    )
    dlq_topic: str = _setting(
        "rerank.requests.dlq",
        "Dead-letter topic for records that cannot be answered.",
        "Kafka",
        min_length=1,
    )
    group_id: str = _setting(
        "rerank-workers", "Consumer group shared by all workers.", "Kafka", min_length=1
    )
    client_id: str | None = _setting(
        None, "Kafka client id; unset means rerank-worker-HOSTNAME.", "Kafka"
    )
    allowed_reply_topics: str | None = _setting(
        None,
        "Regular expression (full match) of the reply topics a request may name; unset "
        "means the reply topic and every topic named REPLY_TOPIC.SUFFIX "
        "(rerank.replies.team-a). Other reply topics get a dead-letter record.",
        "Kafka",
    )
    reply_topic_wait_s: float = _setting(
        5.0,
        "Longest wait for a requested reply topic's metadata; a lookup that fails or "
        "times out is no verdict and is tried again.",
        "Kafka",
        gt=0,
    )
    delivery: Delivery = _setting(
        "at_least_once",
        "at_least_once: replies are produced as requests are answered; a crash can repeat "
        "some (the SDK drops duplicates). exactly_once: each partition's replies and "
        "offsets commit in one Kafka transaction; read_committed readers see each reply "
        "once, up to commit_interval_s later.",
        "Kafka",
    )
    transactional_id_prefix: str = _setting(
        "rerank",
        "exactly_once: the start of each partition's transactional id (one per deployment "
        "sharing a Kafka cluster).",
        "Kafka",
        min_length=1,
    )
    reply_timeout_s: float = _setting(
        30.0,
        "A reply that keeps failing (broker away, topic lookups timing out) is retried "
        "this long, or until the request's deadline, then the request is dead-lettered.",
        "Kafka",
        gt=0,
    )
    group_instance_id: str | None = _setting(
        None,
        "Static group membership: a stable id per worker (the GPU index, a StatefulSet "
        "pod name). A worker back under the same id within the session timeout keeps its "
        "partitions: a rolling restart moves none. Unset: dynamic membership.",
        "Kafka",
    )
    connect_timeout_s: float = _setting(
        300.0,
        "At start, how long to keep trying to reach the brokers (not ready meanwhile); "
        "0 keeps trying for as long as the worker runs. A refused login fails at once.",
        "Kafka",
        ge=0,
    )

    # Kafka tuning
    session_timeout_ms: int = _setting(
        10_000, "Consumer group session timeout.", "Kafka tuning", gt=0
    )
    heartbeat_interval_ms: int = _setting(
        3_000, "Consumer group heartbeat interval.", "Kafka tuning", gt=0
    )
    max_poll_interval_ms: int = _setting(
        300_000,
        "Longest time between polls before the group evicts the worker.",
        "Kafka tuning",
        gt=0,
    )
    rebalance_timeout_ms: int = _setting(
        60_000,
        "How long the group waits for members to finish their revoke handlers; must "
        "cover revoke_timeout_s plus the commit after it.",
        "Kafka tuning",
        gt=0,
    )
    max_poll_records: int = _setting(
        500, "Most records taken from the consumer per poll.", "Kafka tuning", gt=0
    )
    producer_linger_ms: int = _setting(
        0,
        "How long the producer waits to batch replies (0: at once; replies still batch "
        "while a send is in flight).",
        "Kafka tuning",
        ge=0,
    )
    commit_interval_s: float = _setting(
        0.1,
        "A finished request's offset is committed within this long (never more often): "
        "few answered requests are left uncommitted when a worker is killed.",
        "Kafka tuning",
        gt=0,
    )
    max_uncommitted_records: int = _setting(
        10_000,
        "A partition with this many records waiting behind an unfinished one stops "
        "fetching until it clears (bounded memory).",
        "Kafka tuning",
        gt=0,
    )
    max_record_attempts: int = _setting(
        3,
        "A record started this many times without being finished (its worker died or "
        "left mid-record each time) is dead-lettered as poison_record, not processed again.",
        "Kafka tuning",
        gt=0,
    )
    revoke_timeout_s: float = _setting(
        10.0,
        "On a rebalance, how long revoked partitions' in-flight requests may take to finish "
        "before the partitions are let go (the rest is redelivered).",
        "Kafka tuning",
        gt=0,
    )
    missing_topic_ttl_s: float = _setting(
        10.0, "How long a missing reply topic is remembered as missing.", "Kafka tuning", gt=0
    )
    lag_interval_s: float = _setting(
        5.0, "How often the consumer-lag metric is refreshed.", "Kafka tuning", gt=0
    )

    # Kafka security
    security_protocol: SecurityProtocol = _setting(
        "PLAINTEXT", f"Kafka security protocol: {', '.join(PROTOCOLS)}.", "Kafka security"
    )
    sasl_mechanism: SaslMechanism | None = _setting(
        None,
        f"SASL mechanism ({', '.join(SASL_MECHANISMS)}); needed with SASL_* protocols.",
        "Kafka security",
    )
    sasl_username: str | None = _setting(None, "SASL user name.", "Kafka security")
    sasl_password: SecretStr | None = _setting(
        None,
        "SASL password (secret; prefer the environment variable, flags show in ps).",
        "Kafka security",
    )
    ssl_cafile: str | None = _setting(
        None,
        "CA bundle (PEM) to verify the brokers; unset means the system CAs.",
        "Kafka security",
    )
    ssl_certfile: str | None = _setting(
        None, "Client certificate (PEM) for mutual TLS.", "Kafka security"
    )
    ssl_keyfile: str | None = _setting(
        None, "Client private key (PEM) for mutual TLS.", "Kafka security"
    )
    ssl_password: SecretStr | None = _setting(
        None,
        "Password of the client private key (secret; prefer the environment variable).",
        "Kafka security",
    )

    # Model
    model: str = _setting(
        "Qwen/Qwen3-Reranker-0.6B",
        "Model: a local folder or a Hugging Face model id.",
        "Model",
        min_length=1,
    )
    device: str = _setting(
        "auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.", "Model"
    )
    dtype: str = _setting(
        "auto",
        f"Weights dtype: {', '.join(_DTYPES)} (auto: bfloat16 on cuda, float32 on cpu).",
        "Model",
    )
    attn_implementation: str = _setting(
        "auto",
        "Attention implementation passed to transformers (auto: sdpa).",
        "Model",
        min_length=1,
    )
    max_pair_tokens: int = _setting(
        8192,
        "Most tokens of one (query, document) prompt; longer documents are truncated. "
        "Capped by the model's max_position_embeddings.",
        "Model",
        gt=0,
    )
    compile: Switch = _setting(
        "auto", "torch.compile the model: auto (on for cuda), on, off.", "Model"
    )
    packed: Switch = _setting(
        "auto",
        "Padding-free packed batches with varlen attention: auto (on for cuda when "
        "available), on, off.",
        "Model",
    )
    cuda_graphs: Switch = _setting(
        "auto",
        "Replay small packed batches (up to cuda_graph_max_tokens) from captured CUDA "
        "graphs: auto or on (whenever the packed path runs), off. Cuts a lone request's "
        "latency; costs a few seconds at start and some GPU memory.",
        "Model",
    )
    cuda_graph_max_tokens: int = _setting(
        8192,
        "The largest batch, in stream tokens, replayed from a CUDA graph (buckets of 256-512 "
        "tokens up to 8,192, then of 1,024). A larger batch issues its layers from Python. "
        "More graphs cost warm-up time and GPU memory; quick batches are cut to this size.",
        "Model",
        ge=512,
    )
    layers: Layers = _setting(
        "auto",
        "How the packed path runs each decoder layer: auto or compiled (torch.compile "
        "regions), kernels (fused Triton row kernels around bf16 GEMMs), fp8 (the same "
        "with FP8 linear layers; compute capability 8.9 or newer; 1.3-1.6x faster on an "
        "H200 but scores drift about 10x further from fp32 than bf16: see "
        "docs/benchmarks.md), fp8-normed (FP8 for q/k/v and gate/up only). All but auto "
        "and compiled turn the packed path on.",
        "Model",
    )
    fp8_bf16_last_layers: int = _setting(
        4,
        "With layers=fp8 or fp8-normed: how many of the last decoder layers keep bf16 "
        "linear layers (the embeddings, norms and the yes/no head always do), as the "
        "published W8A8 build of Qwen3-Reranker-4B does with 4 (docs/engine.md).",
        "Model",
        ge=0,
    )
    split_long_documents: bool = _setting(
        False,
        "A document longer than max_pair_tokens allows is scored as overlapping windows "
        "that fit, taking its best window's score (the reply's result says which window), "
        "instead of being truncated; a request's split_long_documents overrides this.",
        "Model",
    )
    window_overlap_tokens: int = _setting(
        256,
        "Tokens each window of a split document shares with the next (at most half a window).",
        "Model",
        ge=0,
    )
    max_windows_per_document: int = _setting(
        16,
        "Most windows a split document is scored in; what is left after them is truncated.",
        "Model",
        ge=1,
    )
    tokenizer_backend: TokenizerBackend = _setting(
        "auto",
        "How Qwen3 prompts are tokenized: auto (tiktoken when it gives the model "
        "tokenizer's exact ids, checked at start, else the model's own tokenizer), "
        "tiktoken (refuse to start otherwise), huggingface (the model's own Rust "
        "tokenizer). The ids are the same; tiktoken tokenized a lone 8-document request in "
        "1.1 ms against 2.6 on a 16-core host (docs/benchmarks.md).",
        "Model",
    )
    default_instruction: str = _setting(
        DEFAULT_INSTRUCTION,
        "Instruction used when a request gives none.",
        "Model",
        min_length=1,
    )

    # Batching and back-pressure
    max_batch_tokens: int = _setting(
        65536,
        "Token budget of one batch (padded cost: longest pair x pairs).",
        "Batching and back-pressure",
        gt=0,
    )
    max_batch_pairs: int = _setting(
        512, "Most pairs in one batch.", "Batching and back-pressure", gt=0
    )
    max_wait_ms: float = _setting(
        2.0,
        "How long an idle device waits for requests still being tokenized before running "
        "a small batch (a lone request does not wait).",
        "Batching and back-pressure",
        ge=0,
    )
    quick_batch_backlog: float = _setting(
        4.0,
        "While fewer than this many quick batches' worth of tokens wait, batches are cut no "
        "bigger than the largest CUDA graph (cuda_graph_max_tokens), which is cheap to issue; a "
        "larger backlog gets max_batch_tokens for throughput. 0: always max_batch_tokens.",
        "Batching and back-pressure",
        ge=0,
    )
    min_batch_tokens: int = _setting(
        4096,
        "After running out of device memory the token budget shrinks, never below this.",
        "Batching and back-pressure",
        gt=0,
    )
    tokenizer_threads: int = _setting(
        4,
        "Threads that tokenize requests (the Rust tokenizer releases the GIL; "
        "docs/benchmarks.md shows how many keep one GPU fed).",
        "Batching and back-pressure",
        gt=0,
    )
    inflight_high_pairs: int = _setting(
        4096,
        "Pause every assigned partition when more (query, document) pairs than this are "
        "accepted and not yet answered (Kafka is the buffer).",
        "Batching and back-pressure",
        gt=0,
    )
    inflight_low_pairs: int = _setting(
        2048,
        "Resume the partitions once in-flight pairs fall to this or below.",
        "Batching and back-pressure",
        ge=0,
    )
    inflight_target_s: float = _setting(
        0.0,
        "When above 0, the high mark follows the measured rate: the pairs this worker "
        "answers in this many seconds, at most inflight_high_pairs and at least "
        "inflight_min_pairs (the low mark keeps its ratio). A slow model then holds seconds "
        "of work, not a fixed count; what waits in Kafka is taken oldest first, and the "
        "tail under overload still grows a little (docs/worker.md). 0: fixed marks.",
        "Batching and back-pressure",
        ge=0,
    )
    inflight_min_pairs: int = _setting(
        1024,
        "The smallest high mark, and the high mark until a rate is measured.",
        "Batching and back-pressure",
        gt=0,
    )
    engine_stall_timeout_s: float = _setting(
        120.0,
        "With work outstanding, the model must finish a batch at least this often; "
        "otherwise the engine has failed and the worker steps aside (exit 1).",
        "Batching and back-pressure",
        gt=0,
    )

    # Request limits
    max_documents: int = _setting(1000, "Most documents in one request.", "Request limits", gt=0)
    max_request_bytes: int = _setting(
        4_000_000, "Largest request record value, in bytes.", "Request limits", gt=0
    )
    max_query_chars: int = _setting(
        10_000, "Longest query, in characters; 0 means no limit.", "Request limits", ge=0
    )
    max_instruction_chars: int = _setting(
        10_000, "Longest instruction, in characters; 0 means no limit.", "Request limits", ge=0
    )
    max_document_chars: int = _setting(
        0,
        "Longest document, in characters; 0 means no limit (long documents are truncated "
        "to max_pair_tokens anyway).",
        "Request limits",
        ge=0,
    )
    default_max_age_s: float = _setting(
        0.0,
        "A request without a deadline-ms header expires this long after its record "
        "timestamp; 0 means never (producer clocks set CreateTime and may be skewed).",
        "Request limits",
        ge=0,
    )

    # Service
    drain_timeout_s: float = _setting(
        30.0,
        "On SIGTERM, how long to finish in-flight requests before leaving the group.",
        "Service",
        gt=0,
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
        problems = self._cross_field_problems()
        if problems:
            raise _CrossFieldProblems(problems)
        return self

    def _cross_field_problems(self) -> list[str]:
        # Checks that involve a field which failed its own validation are skipped: that
        # field holds a stand-in default here (see settings_from), not the user's value.
        skip = _SKIP_CHECKS_OF.get()
        checks: list[tuple[tuple[str, ...], Callable[[], list[str]]]] = [
            (("inflight_low_pairs", "inflight_high_pairs"), self._inflight_problems),
            (("heartbeat_interval_ms", "session_timeout_ms"), self._heartbeat_problems),
            (("revoke_timeout_s", "rebalance_timeout_ms"), self._rebalance_problems),
            (("allowed_reply_topics", "reply_topic"), self._reply_pattern_problems),
            (("request_topic", "reply_topic", "dlq_topic"), self._shared_topics),
            (_SECURITY_FIELDS, self._security_problems),
        ]
        found: list[str] = []
        for fields, check in checks:
            if skip.isdisjoint(fields):
                found.extend(check())
        return found

    def _inflight_problems(self) -> list[str]:
        if self.inflight_low_pairs < self.inflight_high_pairs:
            return []
        return [
            f"{_env('inflight_low_pairs')} ({self.inflight_low_pairs}) must be below "
            f"{_env('inflight_high_pairs')} ({self.inflight_high_pairs})"
        ]

    def _heartbeat_problems(self) -> list[str]:
        if self.heartbeat_interval_ms < self.session_timeout_ms:
            return []
        return [
            f"{_env('heartbeat_interval_ms')} ({self.heartbeat_interval_ms}) must be below "
            f"{_env('session_timeout_ms')} ({self.session_timeout_ms})"
        ]

    def _rebalance_problems(self) -> list[str]:
        from consumer.service.worker_config import rebalance_time_needed_ms

        needed = rebalance_time_needed_ms(self.revoke_timeout_s)
        if self.rebalance_timeout_ms >= needed:
            return []
        return [
            f"{_env('rebalance_timeout_ms')} ({self.rebalance_timeout_ms}) must be at least "
            f"{needed}: {_env('revoke_timeout_s')} plus the commit after it and a margin"
        ]

    def _security_problems(self) -> list[str]:
        found = [f"Kafka security: {p}" for p in self._unchecked_security().problems()]
        return found + self._missing_files()

    def _reply_pattern_problems(self) -> list[str]:
        if self.allowed_reply_topics is None:
            return []
        try:
            pattern = re.compile(self.allowed_reply_topics)
        except re.error as exc:
            return [
                f"{_env('allowed_reply_topics')}: not a valid regular expression ({exc}): "
                f"{self.allowed_reply_topics!r}"
            ]
        if not pattern.fullmatch(self.reply_topic):
            return [
                f"{_env('allowed_reply_topics')} {self.allowed_reply_topics!r} does not allow "
                f"the reply topic {self.reply_topic!r}"
            ]
        return []

    def _shared_topics(self) -> list[str]:
        # A worker that replies into (or dead-letters into) its own request topic would
        # consume its own output forever.
        roles = {
            "request": self.request_topic,
            "reply": self.reply_topic,
            "dead-letter": self.dlq_topic,
        }
        names = list(roles)
        return [
            f"the {a} topic and the {b} topic are both {roles[a]!r}"
            for i, a in enumerate(names)
            for b in names[i + 1 :]
            if roles[a] == roles[b]
        ]

    def _missing_files(self) -> list[str]:
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            return []
        return [
            f"{_env(name)}: no such file: {path}"
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
        """Options for :func:`consumer.runtime.loader.load_model`."""
        from consumer.runtime.options import ModelOptions

        return ModelOptions(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            max_pair_tokens=self.max_pair_tokens,
            compile=self.compile,
            packed=self.packed,
            cuda_graphs=self.cuda_graphs,
            cuda_graph_max_tokens=self.cuda_graph_max_tokens,
            layers=self.layers,
            fp8_bf16_last_layers=self.fp8_bf16_last_layers,
            tokenizer_backend=self.tokenizer_backend,
            default_instruction=self.default_instruction,
        )

    def engine_settings(self) -> EngineSettings:
        """Settings of :class:`consumer.engine.engine.Engine`."""
        from consumer.engine.settings import EngineSettings

        return EngineSettings(
            max_batch_tokens=self.max_batch_tokens,
            max_batch_pairs=self.max_batch_pairs,
            max_wait_ms=self.max_wait_ms,
            quick_backlog=self.quick_batch_backlog,
            min_batch_tokens=self.min_batch_tokens,
            tokenizer_threads=self.tokenizer_threads,
            stall_timeout_s=self.engine_stall_timeout_s,
            split_long_documents=self.split_long_documents,
            window_overlap_tokens=self.window_overlap_tokens,
            max_windows_per_document=self.max_windows_per_document,
        )

    def worker_config(self) -> WorkerConfig:
        """Configuration of :class:`consumer.service.worker.Worker`."""
        from consumer.service.codec import RequestLimits
        from consumer.service.worker_config import WorkerConfig

        return WorkerConfig(
            bootstrap_servers=self.bootstrap_servers,
            request_topic=self.request_topic,
            reply_topic=self.reply_topic,
            dlq_topic=self.dlq_topic,
            group_id=self.group_id,
            client_id=self.effective_client_id,
            allowed_reply_topics=self.allowed_reply_topics,
            reply_topic_wait_s=self.reply_topic_wait_s,
            reply_timeout_s=self.reply_timeout_s,
            delivery=self.delivery,
            transactional_id_prefix=self.transactional_id_prefix,
            group_instance_id=self.group_instance_id,
            connect_timeout_s=self.connect_timeout_s,
            security=self.kafka_security(),
            inflight_high_pairs=self.inflight_high_pairs,
            inflight_low_pairs=self.inflight_low_pairs,
            inflight_target_s=self.inflight_target_s,
            inflight_min_pairs=self.inflight_min_pairs,
            limits=RequestLimits(
                max_documents=self.max_documents,
                max_request_bytes=self.max_request_bytes,
                max_query_chars=self.max_query_chars or None,
                max_instruction_chars=self.max_instruction_chars or None,
                max_document_chars=self.max_document_chars or None,
            ),
            default_max_age_s=self.default_max_age_s,
            drain_timeout_s=self.drain_timeout_s,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            max_poll_interval_ms=self.max_poll_interval_ms,
            rebalance_timeout_ms=self.rebalance_timeout_ms,
            max_poll_records=self.max_poll_records,
            producer_linger_ms=self.producer_linger_ms,
            commit_interval_s=self.commit_interval_s,
            max_uncommitted_records=self.max_uncommitted_records,
            max_record_attempts=self.max_record_attempts,
            revoke_timeout_s=self.revoke_timeout_s,
            missing_topic_ttl_s=self.missing_topic_ttl_s,
            lag_interval_s=self.lag_interval_s,
        )


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
    and, among the others, every inconsistency.
    """
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = _problem_lines(exc)
        failed = frozenset(str(e["loc"][0]) for e in exc.errors() if e.get("loc"))
        if failed:
            problems.extend(_cross_field_problems_without(values, failed))
        raise SettingsError(problems) from None


def _cross_field_problems_without(values: Mapping[str, Any], failed: frozenset[str]) -> list[str]:
    """The cross-field problems of ``values`` with the ``failed`` fields left out."""
    stand_ins = {name: Settings.model_fields[name].default for name in failed}
    token = _SKIP_CHECKS_OF.set(failed)
    try:
        Settings(**{**values, **stand_ins})
    except ValidationError as exc:
        return [
            line
            for error in exc.errors()
            if isinstance(cause := error.get("ctx", {}).get("error"), _CrossFieldProblems)
            for line in cause.problems
        ]
    finally:
        _SKIP_CHECKS_OF.reset(token)
    return []


def _problem_lines(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for error in exc.errors():
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _CrossFieldProblems):
            lines.extend(cause.problems)
            continue
        lines.append(_field_problem(error))
    return lines


def _field_problem(error: Any) -> str:
    loc = error.get("loc", ())
    field = str(loc[0]) if loc else ""
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    info = Settings.model_fields.get(field)
    if info is None:
        return f"unknown setting {field!r}: {message}" if field else message
    where = _env(field)
    if error.get("type") == "literal_error" and (allowed := choices(info)) is not None:
        message = f"must be one of {', '.join(allowed)}"
    if is_secret(info):
        return f"{where}: {message}"
    return f"{where}: {message} (got {error.get('input')!r})"
