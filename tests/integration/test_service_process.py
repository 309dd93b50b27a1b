"""The whole worker as operators run it: ``python -m consumer`` in its own process.

A tiny random Qwen3 reranker (real tokenizer), the real broker, requests produced and
replies read with confluent-kafka (a client independent of the worker's aiokafka),
health and metrics over HTTP, a real SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import build_broken_qwen3_reranker, build_tiny_qwen3_reranker
from worker_harness import FakeEngine, Topics, running_worker, worker_config

ROOT = Path(__file__).resolve().parents[2]
SECRET = "do-not-print-this-secret"
DRAIN_TIMEOUT_S = 10.0
# Importing torch and loading even a tiny model takes a while on a loaded 2-core CI box.
READY_TIMEOUT_S = 180.0
LIVE_TIMEOUT_S = 30.0
# Interpreter teardown (torch, threads) after the drain; generous, it is only a bound.
EXIT_MARGIN_S = 30.0
REPLY_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3_reranker(tmp_path_factory.mktemp("service-tiny-qwen3"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def worker_env(**settings: str) -> dict[str, str]:
    """The test's environment without any RERANK_* leaking in, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update({f"RERANK_{name.upper()}": value for name, value in settings.items()})
    return env


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines


@contextmanager
def start_worker(tmp_path: Path, env: dict[str, str], port: int) -> Iterator[WorkerProcess]:
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "consumer"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield WorkerProcess(process, log_path, port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def wait_live(http: aiohttp.ClientSession, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + LIVE_TIMEOUT_S
    while True:
        assert worker.process.poll() is None, worker.output()
        try:
            status, body = await get_json(http, f"{worker.base}/health/live")
        except aiohttp.ClientConnectionError:
            if time.monotonic() > deadline:
                raise AssertionError(f"never live:\n{worker.output()}") from None
            await asyncio.sleep(0.05)
            continue
        assert (status, body) == (200, {"status": "live"})
        return


async def ready_answers_until_ready(
    http: aiohttp.ClientSession, worker: WorkerProcess
) -> list[tuple[int, Any]]:
    """Every /health/ready answer from now until the first 200."""
    answers: list[tuple[int, Any]] = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert worker.process.poll() is None, worker.output()
        answers.append(await get_json(http, f"{worker.base}/health/ready"))
        if answers[-1][0] == 200:
            return answers
        await asyncio.sleep(0.1)
    raise AssertionError(f"never ready; last answer {answers[-1]}:\n{worker.output()}")


async def scrape(http: aiohttp.ClientSession, worker: WorkerProcess) -> dict[str, float]:
    """``/metrics`` samples by ``name{labels}``."""
    async with http.get(f"{worker.base}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


async def scrape_until(
    http: aiohttp.ClientSession,
    worker: WorkerProcess,
    condition: Callable[[dict[str, float]], bool],
    what: str,
) -> dict[str, float]:
    """The first ``/metrics`` scrape that meets ``condition``."""
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while True:
        samples = await scrape(http, worker)
        if condition(samples):
            return samples
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {samples}"
        await asyncio.sleep(0.1)


def produce(bootstrap: str, topic: str, correlation_id: str, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    producer.produce(
        topic, key=correlation_id, value=value, headers={"correlation-id": correlation_id}
    )
    assert producer.flush(REPLY_TIMEOUT_S) == 0


def read_replies(bootstrap: str, topic: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Replies on partition 0 of ``topic`` for every wanted correlation id."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    replies: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    try:
        while wanted - replies.keys() and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            headers = dict(message.headers() or [])
            correlation_id = headers["correlation-id"]
            value = message.value()
            assert isinstance(correlation_id, bytes) and isinstance(value, bytes)
            replies[correlation_id.decode()] = json.loads(value)
    finally:
        consumer.close()
    return replies


async def test_worker_process_serves_health_replies_metrics_and_stops_on_sigterm(
    kafka_bootstrap: str, new_topic: Any, tiny_model: Path, tmp_path: Path, http
) -> None:
    requests, replies, dlq = await new_topic(), await new_topic(), await new_topic()
    port = free_port()
    env = worker_env(
        bootstrap_servers=kafka_bootstrap,
        request_topic=requests,
        reply_topic=replies,
        dlq_topic=dlq,
        group_id=f"service-{uuid.uuid4().hex}",
        model=str(tiny_model),
        device="cpu",
        http_host="127.0.0.1",
        http_port=str(port),
        drain_timeout_s=str(DRAIN_TIMEOUT_S),
        lag_interval_s="0.2",
        log_format="json",
        sasl_password=SECRET,  # unused with PLAINTEXT; must never be printed
    )

    with start_worker(tmp_path, env, port) as worker:
        await wait_live(http, worker)
        answers = await ready_answers_until_ready(http, worker)
        status, body = answers[0]
        assert status == 503
        assert body["status"] == "not_ready"
        assert "model loading" in body["reasons"]
        assert answers[-1] == (200, {"status": "ready"})
        before = await scrape(http, worker)
        assert before["rerank_ready{}"] == 1

        documents = ["Kafka is a distributed log.", "Cats sleep a lot.", "Brokers store topics."]
        good, bad = f"good-{uuid.uuid4().hex}", f"bad-{uuid.uuid4().hex}"
        request = {"query": "what is kafka?", "documents": documents, "return_documents": True}
        await asyncio.to_thread(
            produce, kafka_bootstrap, requests, good, json.dumps(request).encode()
        )
        await asyncio.to_thread(produce, kafka_bootstrap, requests, bad, b"{not json")
        got = await asyncio.to_thread(read_replies, kafka_bootstrap, replies, {good, bad})

        assert set(got) == {good, bad}, worker.output()
        reply = got[good]
        assert reply["id"] == good
        assert reply["model"] == tiny_model.name  # a name, never the folder's path
        assert sorted(r["index"] for r in reply["results"]) == [0, 1, 2]
        scores = [r["relevance_score"] for r in reply["results"]]
        assert scores == sorted(scores, reverse=True)
        assert all(documents[r["index"]] == r["document"] for r in reply["results"])
        assert reply["usage"]["prompt_tokens"] > 0
        assert got[bad]["error"]["code"] == "invalid_request"

        lag_key = f'rerank_consumer_lag{{partition="0",topic="{requests}"}}'
        after = await scrape_until(
            http,
            worker,
            lambda m: m.get(lag_key) == 0 and m.get("rerank_in_flight_pairs{}") == 0,
            "the lag of the request partition and the pairs in flight to reach 0",
        )

        def moved(name: str) -> float:
            return after[name] - before.get(name, 0.0)

        assert after['rerank_requests_total{outcome="ok"}'] == 1, after
        assert after['rerank_requests_total{outcome="invalid_request"}'] == 1, after
        assert after['rerank_errors_total{code="invalid_request"}'] == 1, after
        assert moved("rerank_pairs_total{}") == 3
        assert after["rerank_tokens_total{}"] >= reply["usage"]["prompt_tokens"]
        # The engine's metrics (it gets the service's registry), per batch and per pair.
        assert moved("rerank_queue_wait_seconds_count{}") == 3
        assert moved("rerank_batch_pairs_sum{}") == 3
        assert moved("rerank_inference_seconds_count{}") >= 1
        assert moved("rerank_batch_tokens_count{}") == moved("rerank_inference_seconds_count{}")
        assert moved("rerank_batch_padding_ratio_count{}") >= 1
        # End to end, record timestamp to reply acknowledged: both replies.
        assert moved("rerank_request_latency_seconds_count{}") == 2
        assert after["rerank_consumer_paused{}"] == 0
        assert after["rerank_ready{}"] == 1
        infos = [k for k in after if k.startswith("rerank_model_info{")]
        assert len(infos) == 1, infos
        assert f'model="{tiny_model.name}"' in infos[0] and 'device="cpu"' in infos[0]
        assert not any(k.startswith("rerank_gpu_memory_bytes") for k in after), "no GPU here"

        worker.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.process.wait, timeout=DRAIN_TIMEOUT_S + EXIT_MARGIN_S)
        output = worker.output()

    assert code == 0, output
    assert SECRET not in output
    lines = worker.json_lines()
    starts = [line for line in lines if line["message"] == "rerank worker starting"]
    assert len(starts) == 1
    assert starts[0]["settings"]["sasl_password"] == "**********"
    assert starts[0]["settings"]["request_topic"] == requests
    stops = [line for line in lines if line["message"].startswith("rerank worker stopped")]
    assert len(stops) == 1
    assert stops[0]["exit_code"] == 0
    # Our own code logs ERROR only for real failures (client libraries may log transient
    # broker trouble at ERROR on a loaded machine; that is not this test's subject).
    ours = [line for line in lines if line["logger"].startswith("consumer")]
    assert not [line for line in ours if line["level"] in ("ERROR", "CRITICAL")], output
    # No per-request line at info level (the error reply's line is at debug).
    per_request = [
        line
        for line in ours
        if line["level"] == "INFO"
        and ({"offset", "correlation_id"} & line.keys() or good in str(line) or bad in str(line))
    ]
    assert per_request == [], per_request


def test_invalid_settings_exit_2_with_one_line_per_problem() -> None:
    env = worker_env(http_port="70000", inflight_low_pairs="9000", sasl_password=SECRET)
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "--log-format", "xml", "--inflight-high-pairs", "100"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    assert any("RERANK_HTTP_PORT" in line and "70000" in line for line in lines)
    assert any("RERANK_LOG_FORMAT" in line and "xml" in line for line in lines)
    assert any("RERANK_INFLIGHT_LOW_PAIRS" in line for line in lines)
    assert SECRET not in result.stderr + result.stdout


def test_missing_model_folder_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    env = worker_env(
        model=str(missing), http_host="127.0.0.1", http_port=str(free_port()), log_format="json"
    )
    result = subprocess.run(
        [sys.executable, "-m", "consumer"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1, result.stderr
    assert str(missing) in errors[0]["message"]
    assert "no such folder" in errors[0]["message"]
    assert "exception" not in errors[0]  # one line, no traceback


async def test_sigterm_during_model_load_exits_0_at_once(
    tiny_model: Path, tmp_path: Path, http
) -> None:
    port = free_port()
    env = worker_env(
        model=str(tiny_model), device="cpu", http_host="127.0.0.1", http_port=str(port)
    )

    with start_worker(tmp_path, env, port) as worker:
        await wait_live(http, worker)
        status, body = await get_json(http, f"{worker.base}/health/ready")
        worker.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.process.wait, timeout=EXIT_MARGIN_S)
        output = worker.output()

    assert status == 503
    assert "model loading" in body["reasons"]
    assert code == 0, output
    assert "SIGTERM while starting" in output


async def test_a_model_that_gives_nan_never_becomes_ready_and_its_partner_answers_all(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, http
) -> None:
    """A checkpoint whose every weight is NaN loads and runs without raising. It used to
    become ready and answer every request it was assigned with a committed ``internal``
    error (half of them, next to a healthy partner). Now its warm-up refuses: the process
    exits 1 with one line, never joins, and the healthy worker answers everything."""
    broken_model = build_broken_qwen3_reranker(tmp_path / "nan-qwen3")
    requests, replies, dlq = await new_topic(partitions=2), await new_topic(), await new_topic()
    group = f"service-{uuid.uuid4().hex}"
    port = free_port()
    env = worker_env(
        bootstrap_servers=kafka_bootstrap,
        request_topic=requests,
        reply_topic=replies,
        dlq_topic=dlq,
        group_id=group,
        model=str(broken_model),
        device="cpu",
        http_host="127.0.0.1",
        http_port=str(port),
        log_format="json",
    )
    topics = Topics(requests, replies, dlq)
    config = worker_config(kafka_bootstrap, topics, group)
    async with running_worker(config, FakeEngine()):
        with start_worker(tmp_path, env, port) as broken:
            exit_code = await asyncio.to_thread(broken.process.wait, READY_TIMEOUT_S)
            output = broken.output()
            ids = [f"c-{i}-{uuid.uuid4().hex}" for i in range(20)]
            body = json.dumps({"query": "q", "documents": ["a", "b"]}).encode()
            for correlation_id in ids:
                await asyncio.to_thread(produce, kafka_bootstrap, requests, correlation_id, body)
            got = await asyncio.to_thread(read_replies, kafka_bootstrap, replies, set(ids))
    assert exit_code == 1, output
    assert "check pair" in output and "partitions assigned" not in output, output
    assert set(got) == set(ids)
    assert all("results" in reply for reply in got.values()), got
