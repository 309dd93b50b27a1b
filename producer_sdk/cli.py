"""``rerank-client``: rerank documents from the command line through the Kafka service.

::

    rerank-client "what is kafka?" "a distributed log" "a novelist from Prague"
    echo '{"query": "what is kafka?", "documents": ["a log", "a novelist"]}' | rerank-client --json

Exit status: 0 ranking printed, 2 bad arguments or input, 1 error reply, timeout or
Kafka failure (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import orjson

from kafka_common.cli_args import add_security_arguments, security_from_args
from kafka_common.security import KafkaSecurity
from producer_sdk.client import DEFAULT_REPLY_TOPIC, DEFAULT_REQUEST_TOPIC, RerankClient
from producer_sdk.errors import InvalidArgument, RerankError, RerankErrorReply
from producer_sdk.request import build_request_body, check_timeout
from producer_sdk.result import RerankResult
from producer_sdk.retry import DEFAULT_RETRY, RetryPolicy

PROG = "rerank-client"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGS = 2
EXIT_INTERRUPTED = 130
DEFAULT_WIDTH = 100
MIN_DOCUMENT_WIDTH = 10
STDIN_FIELDS = frozenset({"query", "documents", "instruction", "top_n", "raw_scores", "truncate"})


@dataclass(frozen=True)
class RerankInput:
    """What to rerank, from the command line or from JSON on stdin."""

    query: str
    documents: list[str]
    instruction: str | None = None
    top_n: int | None = None
    raw_scores: bool = False
    truncate: bool = True


# -- formatting (pure) ------------------------------------------------------------------


def format_table(result: RerankResult, documents: Sequence[str], width: int) -> str:
    """The ranking as a table: rank, score, index and the document cut to ``width``; then
    a line naming the documents the service truncated, if it did."""
    rows = [
        (str(rank), f"{item.score:.4f}", str(item.index), documents[item.index])
        for rank, item in enumerate(result.results, start=1)
    ]
    header = ("rank", "score", "index", "document")
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(3)]
    fixed = sum(widths) + 2 * len(widths)
    document_width = max(width - fixed, MIN_DOCUMENT_WIDTH)
    lines = []
    for rank, score, index, document in [header, *rows]:
        cells = (rank.rjust(widths[0]), score.rjust(widths[1]), index.rjust(widths[2]))
        lines.append("  ".join(cells) + "  " + _one_line(document, document_width))
    if result.truncated:
        indices = ", ".join(str(i) for i in result.truncated)
        lines.append(_one_line(f"truncated to fit the model: documents {indices}", width))
    return "\n".join(lines)


def format_json(result: RerankResult, documents: Sequence[str]) -> str:
    """The result in the reply's JSON shape, each result with its document text."""
    return orjson.dumps(
        result.with_documents(documents).to_dict(), option=orjson.OPT_INDENT_2
    ).decode()


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# -- arguments -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``rerank-client``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Rerank documents against a query with the Kafka rerank service. "
            "Give the query and documents as arguments, or as JSON on stdin: "
            '{"query": ..., "documents": [...], "instruction"?: ..., "top_n"?: ...}.'
        ),
    )
    parser.add_argument("query", nargs="?", help="the query (omit to read JSON from stdin)")
    parser.add_argument("documents", nargs="*", help="the candidate documents")
    kafka = parser.add_argument_group("kafka")
    kafka.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("RERANK_BOOTSTRAP_SERVERS", "localhost:9092"),
        help="host:port[,host:port...] (env RERANK_BOOTSTRAP_SERVERS; default %(default)s)",
    )
    kafka.add_argument("--request-topic", default=DEFAULT_REQUEST_TOPIC)
    kafka.add_argument("--reply-topic", default=DEFAULT_REPLY_TOPIC)
    kafka.add_argument("--reply-partition", type=int, help="default: a random partition")
    kafka.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    kafka.add_argument(
        "--retries",
        type=int,
        metavar="N",
        default=DEFAULT_RETRY.attempts - 1,
        help="send again after a retriable failure up to N times (default %(default)s; 0: never)",
    )
    kafka.add_argument(
        "--retry-budget",
        type=float,
        metavar="SECONDS",
        help="time for all attempts (default: --timeout); above --timeout, a request with no "
        "reply within --timeout is sent again",
    )
    request = parser.add_argument_group("request")
    request.add_argument("--top-n", type=int, help="print only the best N results")
    request.add_argument("--instruction", help="task instruction for the model")
    request.add_argument("--raw-scores", action="store_true", help="raw logits, not [0, 1]")
    request.add_argument(
        "--no-truncate",
        dest="truncate",
        action="store_false",
        default=None,
        help="fail (invalid_request) instead of cutting documents too long for the model",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the result as JSON")
    output.add_argument("-v", "--verbose", action="count", default=0, help="log (-vv: debug)")
    add_security_arguments(parser)
    return parser


def read_input(args: argparse.Namespace, stdin: TextIO) -> RerankInput:
    """The query and documents from the arguments, else from JSON on ``stdin``.

    Flags (``--top-n``, ``--instruction``, ``--raw-scores``, ``--no-truncate``) win over
    the JSON's fields.
    Raises :class:`InvalidArgument` for missing or malformed input.
    """
    if args.query is not None:
        if not args.documents:
            raise InvalidArgument("give at least one document after the query")
        given = RerankInput(query=args.query, documents=list(args.documents))
    else:
        if stdin.isatty():
            raise InvalidArgument("give a query and documents, or JSON on stdin")
        given = _input_from_json(stdin.read())
    merged = RerankInput(
        query=given.query,
        documents=given.documents,
        instruction=args.instruction if args.instruction is not None else given.instruction,
        top_n=args.top_n if args.top_n is not None else given.top_n,
        raw_scores=args.raw_scores or given.raw_scores,
        truncate=args.truncate if args.truncate is not None else given.truncate,
    )
    # The SDK's own checks, here so that bad input never waits for a connection.
    build_request_body(
        merged.query,
        merged.documents,
        instruction=merged.instruction,
        top_n=merged.top_n,
        raw_scores=merged.raw_scores,
        truncate=merged.truncate,
    )
    return merged


def _input_from_json(text: str) -> RerankInput:
    try:
        data: Any = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise InvalidArgument(f"stdin is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("stdin JSON must be an object with 'query' and 'documents'")
    unknown = sorted(set(data) - STDIN_FIELDS)
    if unknown:
        raise InvalidArgument(f"stdin JSON has unknown fields: {', '.join(unknown)}")
    missing = [name for name in ("query", "documents") if name not in data]
    if missing:
        raise InvalidArgument(f"stdin JSON lacks {' and '.join(repr(m) for m in missing)}")
    # Field types are checked by build_request_body, with the SDK's own messages.
    return RerankInput(
        query=data["query"],
        documents=data["documents"],
        instruction=data.get("instruction"),
        top_n=data.get("top_n"),
        raw_scores=data.get("raw_scores", False),
        truncate=data.get("truncate", True),
    )


def retry_policy(args: argparse.Namespace) -> RetryPolicy:
    """The retry policy the flags ask for; :class:`InvalidArgument` when they are wrong."""
    if args.retries < 0:
        raise InvalidArgument(f"--retries must be 0 or more, not {args.retries}")
    return RetryPolicy(attempts=args.retries + 1, budget=args.retry_budget)


# -- running ---------------------------------------------------------------------------


async def run(
    args: argparse.Namespace, given: RerankInput, security: KafkaSecurity
) -> RerankResult:
    """Sends the one request and returns its result."""
    client = RerankClient(
        bootstrap_servers=args.bootstrap_servers.split(","),
        request_topic=args.request_topic,
        reply_topic=args.reply_topic,
        reply_partition=args.reply_partition,
        security=security,
        default_timeout=args.timeout,
        start_timeout=args.timeout,
        client_id=PROG,
        retry=retry_policy(args),
    )
    async with client:
        return await client.rerank(
            given.query,
            given.documents,
            instruction=given.instruction,
            top_n=given.top_n,
            raw_scores=given.raw_scores,
            truncate=given.truncate,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rerank-client`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        security = security_from_args(args)
        given = read_input(args, sys.stdin)
        check_timeout(args.timeout)
        retry_policy(args)
    except ValueError as error:  # InvalidArgument is a ValueError too
        return _fail(EXIT_BAD_ARGS, str(error))
    try:
        result = asyncio.run(run(args, given, security))
    except InvalidArgument as error:
        return _fail(EXIT_BAD_ARGS, str(error))
    except RerankErrorReply as error:
        return _fail(EXIT_FAILED, f"the service answered {error.code}: {error.message}")
    except RerankError as error:
        return _fail(EXIT_FAILED, f"{type(error).__name__}: {error}")
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")
    if args.json:
        print(format_json(result, given.documents))
    else:
        width = shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
        print(format_table(result, given.documents, width))
    return EXIT_OK


def _configure_logging(verbosity: int) -> None:
    # Quiet by default: a failure is reported as one line, not as aiokafka's log noise.
    level = {0: logging.CRITICAL + 1, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )


def _fail(status: int, message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
