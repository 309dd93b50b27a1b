"""The gateway's settings: command-line flags, each defaulting to a ``RERANK_*`` variable.

The Kafka settings (bootstrap servers, topics, security) use the worker's variable names,
so one environment file serves both; the gateway's own start with ``RERANK_GATEWAY_``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from kafka_common.cli_args import add_security_arguments, security_from_args
from kafka_common.security import KafkaSecurity
from producer_sdk.client import DEFAULT_REPLY_TOPIC, DEFAULT_REQUEST_TOPIC

PROG = "rerank-gateway"


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs to serve; see ``rerank-gateway --help``."""

    bootstrap_servers: str = "localhost:9092"
    request_topic: str = DEFAULT_REQUEST_TOPIC
    reply_topic: str = DEFAULT_REPLY_TOPIC
    group_id: str = "rerank-workers"
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    host: str = "0.0.0.0"
    # not 8080: that is the worker's side-port, and both often run on one host
    port: int = 8000
    timeout_s: float = 30.0
    max_concurrency: int = 512
    # Kafka's default largest record (message.max.bytes) is about 1 MiB
    max_body_bytes: int = 1024 * 1024
    # slow clients: a request's line and headers must arrive within header_timeout_s
    # (also how long an idle connection is kept), its body within body_timeout_s; the
    # bodies being read hold at most body_budget_bytes; at most max_connections are open
    header_timeout_s: float = 15.0
    body_timeout_s: float = 30.0
    body_budget_bytes: int = 64 * 1024 * 1024
    max_connections: int = 1024
    api_token: str | None = None
    check_workers_s: float = 5.0
    retry_after_s: int = 1
    log_level: str = "INFO"


DEFAULTS = GatewaySettings()


def _env(name: str, default: object) -> str:
    """``RERANK_<NAME>``, else ``default``, as text: argparse converts and checks a text
    default with the flag's ``type``, so a bad variable is one usage line, as a bad flag is.
    Empty means unset (a compose ``${X:-}`` gives an empty variable)."""
    return os.environ.get(f"RERANK_{name.upper()}") or str(default)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``rerank-gateway``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "HTTP gateway to the Kafka rerank service: Cohere (/v2/rerank, /v1/rerank), "
            "TEI (/rerank with texts) and the wire contract (/rerank with documents). "
            "Each flag defaults to the environment variable in brackets."
        ),
    )
    kafka = parser.add_argument_group("kafka")
    kafka.add_argument(
        "--bootstrap-servers",
        default=_env("bootstrap_servers", DEFAULTS.bootstrap_servers),
        help="[RERANK_BOOTSTRAP_SERVERS] (default %(default)s)",
    )
    kafka.add_argument(
        "--request-topic",
        default=_env("request_topic", DEFAULT_REQUEST_TOPIC),
        help="[RERANK_REQUEST_TOPIC] (default %(default)s)",
    )
    kafka.add_argument(
        "--reply-topic",
        default=_env("reply_topic", DEFAULT_REPLY_TOPIC),
        help="[RERANK_REPLY_TOPIC] (default %(default)s)",
    )
    kafka.add_argument(
        "--group-id",
        default=_env("group_id", DEFAULTS.group_id),
        help="the workers' consumer group, watched to answer 503 at once when it has no "
        "member [RERANK_GROUP_ID] (default %(default)s)",
    )
    http = parser.add_argument_group("http")
    http.add_argument(
        "--host", default=_env("gateway_host", DEFAULTS.host), help="[RERANK_GATEWAY_HOST]"
    )
    http.add_argument(
        "--port",
        type=int,
        default=_env("gateway_port", DEFAULTS.port),
        help="[RERANK_GATEWAY_PORT] (default %(default)s)",
    )
    http.add_argument(
        "--timeout",
        type=_positive_float,
        default=_env("gateway_timeout_s", DEFAULTS.timeout_s),
        help="seconds a call may wait for its reply; then 503 [RERANK_GATEWAY_TIMEOUT_S]",
    )
    http.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=_env("gateway_max_concurrency", DEFAULTS.max_concurrency),
        help="calls in flight at once; more get 429 [RERANK_GATEWAY_MAX_CONCURRENCY]",
    )
    http.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=_env("gateway_max_body_bytes", DEFAULTS.max_body_bytes),
        help="largest request body; larger gets 413 [RERANK_GATEWAY_MAX_BODY_BYTES]",
    )
    http.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=_env("gateway_header_timeout_s", DEFAULTS.header_timeout_s),
        help="seconds a request's line and headers may take to arrive, and an idle "
        "connection is kept [RERANK_GATEWAY_HEADER_TIMEOUT_S] (default %(default)s)",
    )
    http.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=_env("gateway_body_timeout_s", DEFAULTS.body_timeout_s),
        help="seconds a request's body may take to arrive; then 408 "
        "[RERANK_GATEWAY_BODY_TIMEOUT_S] (default %(default)s)",
    )
    http.add_argument(
        "--body-budget-bytes",
        type=_positive_int,
        default=_env("gateway_body_budget_bytes", DEFAULTS.body_budget_bytes),
        help="bytes of the bodies being read at once (memory held for slow uploads); "
        "more wait [RERANK_GATEWAY_BODY_BUDGET_BYTES] (default %(default)s)",
    )
    http.add_argument(
        "--max-connections",
        type=_positive_int,
        default=_env("gateway_max_connections", DEFAULTS.max_connections),
        help="open connections at most; more are closed at once "
        "[RERANK_GATEWAY_MAX_CONNECTIONS] (default %(default)s)",
    )
    http.add_argument(
        "--check-workers",
        type=float,
        default=_env("gateway_check_workers_s", DEFAULTS.check_workers_s),
        help="seconds between looks at the workers' group (0: never look) "
        "[RERANK_GATEWAY_CHECK_WORKERS_S]",
    )
    http.add_argument(
        "--log-level", default=_env("log_level", DEFAULTS.log_level), help="[RERANK_LOG_LEVEL]"
    )
    add_security_arguments(parser)
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> GatewaySettings:
    """Settings from flags (``None``: ``sys.argv[1:]``) and the environment.

    The bearer token is read from ``RERANK_GATEWAY_API_TOKEN`` only: a flag would show
    it in the process list.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        security = security_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    return GatewaySettings(
        bootstrap_servers=args.bootstrap_servers,
        request_topic=args.request_topic,
        reply_topic=args.reply_topic,
        group_id=args.group_id,
        security=security,
        host=args.host,
        port=args.port,
        timeout_s=args.timeout,
        max_concurrency=args.max_concurrency,
        max_body_bytes=args.max_body_bytes,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        body_budget_bytes=args.body_budget_bytes,
        max_connections=args.max_connections,
        api_token=os.environ.get("RERANK_GATEWAY_API_TOKEN") or None,
        check_workers_s=args.check_workers,
        log_level=args.log_level.upper(),
    )
