"""Run the service on this machine until Ctrl-C: the topics, one worker and the gateway.

    python scripts/serve.py --bootstrap-servers 127.0.0.1:9092 [--model NAME_OR_FOLDER]

(``bash scripts/serve.sh`` sets up, starts a local broker and runs this.) It creates the
service's topics if they are missing, starts one worker (``python -m consumer``, the model
chosen as the demo chooses it) and ``rerank-gateway`` on port 8000, waits until both are
ready, prints where they are and how to call them (curl, the ``cohere`` SDK, the
``rerank-client`` CLI), and keeps them running until SIGINT (Ctrl-C) or SIGTERM, then
stops both (the worker drains first). Exit status 0 after a stop asked for; 1 when a part
failed to start or exited on its own, with the last lines of its log.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from demo import (
    DRAIN_TIMEOUT_S,
    EXIT_MARGIN_S,
    READY_TIMEOUT_S,
    SERVE_GATEWAY_PORT,
    DemoError,
    GatewayProcess,
    WorkerProcess,
    choose_model,
    curl_line,
    ensure_topics,
    free_port,
    worker_args,
)

WORKER_HTTP_PORT = 8080  # the worker's own default side-port
EXAMPLE = {
    "model": "qwen3-reranker",
    "query": "what is kafka?",
    "documents": ["a novelist", "a distributed event log"],
}
WATCH_EVERY_S = 0.5


class Stop(Exception):
    """SIGINT or SIGTERM: stop what was started."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP; default %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("RERANK_MODEL") or None,
        help="model folder or hub id (env RERANK_MODEL; default as the demo picks it)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--request-topic", default="rerank.requests")
    parser.add_argument("--reply-topic", default="rerank.replies")
    parser.add_argument("--dlq-topic", default="rerank.requests.dlq")
    parser.add_argument("--group-id", default="rerank-workers")
    parser.add_argument(
        "--gateway-port",
        type=int,
        default=SERVE_GATEWAY_PORT,
        help="the gateway's port on 127.0.0.1 (default %(default)s)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help=f"the worker's side-port (default {WORKER_HTTP_PORT}, or a free one if taken)",
    )
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, metavar="S")
    return parser.parse_args(argv)


def port_taken(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def venv_command(name: str) -> str:
    """How to run this venv's console script ``name`` from the checkout."""
    script = Path(sys.executable).with_name(name)
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def print_ready(args: argparse.Namespace, worker: WorkerProcess, gateway: GatewayProcess) -> None:
    topics = f"{args.request_topic}, {args.reply_topic}, {args.dlq_topic}"
    worker_url = f"http://127.0.0.1:{worker.http_port}"
    client = venv_command("rerank-client")
    cohere_call = (
        f"import cohere; print(cohere.ClientV2(api_key='-', base_url='{gateway.url}')"
        ".rerank(model='m', query='what is kafka?', "
        "documents=['a novelist', 'a distributed event log']))"
    )
    print(
        "\n".join(
            [
                "",
                "running:",
                f"  gateway  {gateway.url}  Cohere /v2/rerank and /v1/rerank, TEI /rerank, "
                "the wire contract (/rerank with documents)",
                f"  worker   {worker_url}/health/ready and /metrics  (log {worker.log_path})",
                f"  kafka    {args.bootstrap_servers}  topics {topics}",
                "try it:",
                "  " + curl_line(gateway.url, EXAMPLE),
                f'  {venv_command("python")} -c "{cohere_call}"',
                f"  {client} --bootstrap-servers {args.bootstrap_servers} 'what is kafka?' "
                "'a novelist' 'a distributed event log'",
                "stop: Ctrl-C (stops the gateway and the worker; serve.sh also stops the "
                "broker it started)",
            ]
        ),
        flush=True,
    )


def watch(worker: WorkerProcess, gateway: GatewayProcess) -> None:
    """Until a stop signal (raises Stop) or a part exits on its own (raises DemoError)."""
    while True:
        if (code := worker.process.poll()) is not None:
            raise DemoError(f"the worker exited on its own with code {code}")
        if (code := gateway.process.poll()) is not None:
            raise DemoError(f"the gateway exited on its own with code {code}")
        time.sleep(WATCH_EVERY_S)


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    # Only the first stop signal stops: Ctrl-C reaches serve.sh too, which passes it on as
    # a SIGTERM, and that second signal must not cut short the stop the first one began
    # (raised while the stop is printed, it left the worker and the gateway running).
    ignore_stop_signals()
    raise Stop(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise Stop, once."""
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)


def ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run(args: argparse.Namespace) -> int:
    if port_taken(args.gateway_port):
        raise DemoError(f"port {args.gateway_port} is taken: pass --gateway-port N")
    http_port = args.http_port or (
        free_port() if port_taken(WORKER_HTTP_PORT) else WORKER_HTTP_PORT
    )
    asyncio.run(
        ensure_topics(
            args.bootstrap_servers,
            {args.request_topic: 3, args.reply_topic: 3, args.dlq_topic: 1},
        )
    )
    model = choose_model(args.model)
    folder = Path(tempfile.mkdtemp(prefix="rerank-serve-"))
    worker = WorkerProcess(worker_args(args, model, http_port), folder / "worker.log", http_port)
    print(f"worker started (pid {worker.process.pid}, model {model}); log: {worker.log_path}")
    gateway: GatewayProcess | None = None
    try:
        asyncio.run(worker.wait_ready(args.ready_timeout))
        with (folder / "gateway.log").open("wb") as gateway_log:
            gateway = GatewayProcess(args, args.gateway_port, gateway_log)
        print(f"gateway started (pid {gateway.process.pid}); log: {folder / 'gateway.log'}")
        asyncio.run(gateway.wait_ready())
        print_ready(args, worker, gateway)
        watch(worker, gateway)
    except Stop as stop:
        print(f"\n{stop}: stopping the gateway and the worker", flush=True)
        code = stop_all(worker, gateway)
        print("stopped" if code == 0 else f"the worker exited with code {code}", flush=True)
        return 0 if code == 0 else 1
    except BaseException:
        stop_all(worker, gateway)
        print(f"--- last lines of the worker log ({worker.log_path}) ---", file=sys.stderr)
        print(worker.log_tail(), file=sys.stderr)
        raise
    return 0  # watch() never returns


def stop_all(worker: WorkerProcess, gateway: GatewayProcess | None) -> int | None:
    """Stop the gateway first (no new calls), then the worker; the worker's exit code."""
    ignore_stop_signals()  # a Ctrl-C now must not cut the stop short
    if gateway is not None:
        gateway.stop()
    code, _ = worker.stop(DRAIN_TIMEOUT_S + EXIT_MARGIN_S)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    stop_on_signals()
    try:
        return run(args)
    except DemoError as exc:
        print(f"serve failed: {exc}", file=sys.stderr)
    except Stop:  # a signal before the worker was started
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
