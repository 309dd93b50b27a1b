"""Callers with no SDK of ours, against the real worker process and broker.

- Spring Kafka: the real ``ReplyingKafkaTemplate`` (spring-kafka from Maven Central, built by
  tests/spring/build.sh) with Spring's defaults: its header names, 16-byte binary
  correlation ids, the reply topic from its reply container. A reply topic of its own, one
  shared by two templates, and a reply partition.
- CloudEvents over Kafka, binary mode: events made and read with the ``cloudevents``
  package's Kafka binding.
- kcat, as the README shows it: one JSON line piped to ``kcat -P`` with a
  ``correlation-id`` header, the reply found with ``kcat -C``.

One ``python -m consumer`` (a tiny random Qwen3 reranker on the CPU) serves every test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Producer
from jsonschema import Draft202012Validator
from tiny_models import build_tiny_qwen3_reranker
from worker_harness import Received, TopicReader

from consumer.service.conventions import CE_SOURCE_SERVICE, CE_TYPE_ERROR, CE_TYPE_RESULT
from producer_sdk import RerankClient
from schemas import generate

ROOT = Path(__file__).resolve().parents[2]
SPRING_BUILD = ROOT / "tests" / "spring" / "build.sh"
KCAT = ROOT / "deploy" / "local" / "kcat"
# The first build downloads spring-kafka and Maven's plugins; later ones take no time.
SPRING_BUILD_TIMEOUT_S = 280
SPRING_RUN_TIMEOUT_S = 240
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 30.0
REPLY_VALIDATOR = Draft202012Validator(
    json.loads((Path(generate.__file__).parent / generate.REPLY_FILE).read_text("utf-8"))
)
DOCUMENTS = [
    "Kafka is a distributed event log.",
    "Franz Kafka wrote The Trial.",
    "Brokers keep partitions of topics on disk.",
]
GOOD = {"query": "what is kafka?", "documents": DOCUMENTS, "return_documents": True}
OTHER = {"query": "who wrote the trial?", "documents": DOCUMENTS}
TYPO = {"query": "what is kafka?", "documents": DOCUMENTS, "topn": 1}


@dataclass
class Service:
    bootstrap: str
    requests: str
    replies: str
    worker: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


async def create_topics(admin: AIOKafkaAdminClient, *partitions: int) -> list[str]:
    """Fresh topics with these partition counts, once every partition has a leader."""
    names = [f"test-{uuid.uuid4().hex}" for _ in partitions]
    await admin.create_topics([NewTopic(n, p, 1) for n, p in zip(names, partitions, strict=True)])
    async with asyncio.timeout(10):
        while True:
            described = await admin.describe_topics(names)
            ready = all(
                t["error_code"] == 0 and len([p for p in t["partitions"] if p["leader"] >= 0]) == n
                for t, n in zip(described, partitions, strict=True)
            )
            if ready:
                return names
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def service(
    kafka_bootstrap: str, kafka_admin: AIOKafkaAdminClient, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    folder = tmp_path_factory.mktemp("kafka-callers")
    model = build_tiny_qwen3_reranker(folder / "tiny-qwen3")
    requests, replies, dlq = await create_topics(kafka_admin, 2, 2, 1)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env |= {
        "RERANK_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RERANK_REQUEST_TOPIC": requests,
        "RERANK_REPLY_TOPIC": replies,
        "RERANK_DLQ_TOPIC": dlq,
        "RERANK_GROUP_ID": f"callers-{uuid.uuid4().hex}",
        "RERANK_ALLOWED_REPLY_TOPICS": r"test-[0-9a-f]{32}",
        "RERANK_MODEL": str(model),
        "RERANK_DEVICE": "cpu",
        "RERANK_HTTP_HOST": "127.0.0.1",
        "RERANK_HTTP_PORT": str(port),
        "RERANK_DRAIN_TIMEOUT_S": "10",
    }
    log = folder / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "consumer"], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    running = Service(kafka_bootstrap, requests, replies, worker, log)
    try:
        await wait_ready(running, f"http://127.0.0.1:{port}/health/ready")
        yield running
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(worker.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            code = worker.wait()
    output = running.output()
    assert code == 0, output
    # the clean exit's last line is the worker's own: no teardown noise after it
    assert "rerank worker stopped: exit code 0" in output.rstrip().splitlines()[-1], output[-3000:]
    assert "nanobind" not in output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_ready(service: Service, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            assert service.worker.poll() is None, service.output()
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"worker never ready:\n{service.output()}"
            await asyncio.sleep(0.2)


async def sdk_ranking(service: Service, body: dict[str, Any]) -> list[tuple[int, float]]:
    """(index, score) of the same request sent with our own SDK: what every caller must get."""
    client = RerankClient(
        service.bootstrap, request_topic=service.requests, reply_topic=service.replies
    )
    async with client:
        result = await client.rerank(body["query"], body["documents"], timeout=REPLY_TIMEOUT_S)
    return [(r.index, r.score) for r in result.results]


def assert_same_ranking(reply: dict[str, Any], expected: list[tuple[int, float]]) -> None:
    got = [(r["index"], r["relevance_score"]) for r in reply["results"]]
    assert [i for i, _ in got] == [i for i, _ in expected], (got, expected)
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got, expected, strict=True))


# ------------------------------------------------------------------------ Spring Kafka


def spring_classpath() -> str:
    build = subprocess.run(
        ["bash", str(SPRING_BUILD)],
        capture_output=True,
        text=True,
        timeout=SPRING_BUILD_TIMEOUT_S,
        check=False,
    )
    if build.returncode != 0:
        pytest.fail(f"building the Spring caller failed: {build.stderr.strip()}", pytrace=False)
    return build.stdout.strip()


async def test_spring_replying_kafka_template_with_springs_defaults(
    service: Service, kafka_admin: AIOKafkaAdminClient, tmp_path: Path
) -> None:
    classpath = await asyncio.to_thread(spring_classpath)
    dedicated, shared, partitioned = await create_topics(kafka_admin, 1, 2, 2)
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text("\n".join(json.dumps(b) for b in (GOOD, OTHER, TYPO)) + "\n")
    command = ["java", "-cp", classpath, "kafkarerank.spring.SpringCaller"]
    command += ["--bootstrap", service.bootstrap, "--requests", service.requests]
    command += ["--bodies", str(bodies), "--dedicated", dedicated, "--shared", shared]
    command += ["--partitioned", f"{partitioned}:1"]
    run = await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        timeout=SPRING_RUN_TIMEOUT_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:] + service.output()[-4000:]
    replies = [json.loads(line) for line in run.stdout.splitlines()]
    by_scenario: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for reply in replies:
        by_scenario.setdefault((reply["scenario"], reply["template"]), []).append(reply)
    # every call got its own reply: Spring matched each on the echoed kafka_correlationId
    assert {k: len(v) for k, v in by_scenario.items()} == {
        ("dedicated", 0): 3,
        ("shared", 0): 3,
        ("shared", 1): 3,
        ("partitioned", 0): 3,
    }
    assert {r["topic"] for r in by_scenario[("dedicated", 0)]} == {dedicated}
    assert {r["topic"] for r in by_scenario[("shared", 0)] + by_scenario[("shared", 1)]} == {shared}
    assert {(r["topic"], r["partition"]) for r in by_scenario[("partitioned", 0)]} == {
        (partitioned, 1)
    }

    expected = {
        "what is kafka?": await sdk_ranking(service, GOOD),
        "who wrote the trial?": await sdk_ranking(service, OTHER),
    }
    ids = set()
    for reply in replies:
        headers, value = reply["headers"], reply["value"]
        spring_id = headers["kafka_correlationId"]
        assert len(spring_id) == 32  # Spring's default: the 16 raw bytes of a UUID
        # where the worker needs text, the id is those bytes in hex: body id and our header
        assert value["id"] == spring_id == bytes.fromhex(headers["correlation-id"]).decode()
        ids.add(spring_id)
        REPLY_VALIDATOR.validate(value)
    assert len(ids) == len(replies)
    for calls in by_scenario.values():
        good, other, typo = calls
        assert_same_ranking(good["value"], expected["what is kafka?"])
        assert [r["document"] for r in good["value"]["results"]] == [
            DOCUMENTS[i] for i, _ in expected["what is kafka?"]
        ]
        assert_same_ranking(other["value"], expected["who wrote the trial?"])
        assert typo["value"]["error"]["code"] == "invalid_request"
        assert good["value"]["model"] == "tiny-qwen3"  # the folder's name, never its path
        assert "topn: unknown field" in typo["value"]["error"]["message"]


# ------------------------------------------------------------------------ CloudEvents


def produce_events(bootstrap: str, topic: str, messages: list[KafkaMessage]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for message in messages:
        producer.produce(
            topic, key=message.key, value=message.value, headers=list(message.headers.items())
        )
    assert producer.flush(REPLY_TIMEOUT_S) == 0


def as_cloudevent(record: Received) -> Any:
    headers = {name: value for name, value in record.headers.items() if value is not None}
    assert record.value is not None
    return from_binary(KafkaMessage(headers, record.key, record.value), JSONFormat())


async def replies_for(service: Service, ids: set[str]) -> dict[str, Received]:
    async with TopicReader(service.bootstrap, service.replies, 2) as reader:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while True:
            found = {r.correlation_id: r for r in reader.records if r.correlation_id in ids}
            if found.keys() == ids:
                return found
            assert time.monotonic() < deadline, f"replies for {ids - found.keys()} missing"
            await reader.poll()


async def test_cloudevents_binary_mode_requests_get_cloudevent_replies(service: Service) -> None:
    def event(data: dict[str, Any]) -> CloudEvent:
        attributes = {
            "type": "com.example.search.rerank-requested",
            "source": "/tests/cloudevents",
            "datacontenttype": "application/json",
        }
        return CloudEvent(attributes=attributes, data=data)

    good, typo = event(GOOD), event(TYPO)
    messages = [to_binary(e, JSONFormat()) for e in (good, typo)]
    assert all("ce_id" in m.headers and "correlation-id" not in m.headers for m in messages)
    await asyncio.to_thread(produce_events, service.bootstrap, service.requests, messages)

    found = await replies_for(service, {good.get_id(), typo.get_id()})
    result, error = as_cloudevent(found[good.get_id()]), as_cloudevent(found[typo.get_id()])

    for reply, request in ((result, good), (error, typo)):
        assert reply.get_specversion() == "1.0"
        assert reply.get_id() == request.get_id()  # ce_id was the correlation id
        assert reply.get_source() == CE_SOURCE_SERVICE
        assert reply.get_datacontenttype() == "application/json"
    assert result.get_type() == CE_TYPE_RESULT
    assert error.get_type() == CE_TYPE_ERROR
    data = result.get_data()
    REPLY_VALIDATOR.validate(data)
    assert data["id"] == good.get_id()
    assert_same_ranking(data, await sdk_ranking(service, GOOD))
    assert error.get_data()["error"]["code"] == "invalid_request"
    assert orjson.loads(found[typo.get_id()].value or b"{}")["id"] == typo.get_id()


# ------------------------------------------------------------------------ kcat


def kcat_binary() -> str:
    """kcat, found or fetched by ``deploy/local/kcat fetch`` (scripts/test.sh)."""
    found = subprocess.run([str(KCAT), "path"], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        pytest.fail("kcat is missing: run deploy/local/kcat fetch", pytrace=False)
    return found.stdout.strip()


def readme_kcat_lines() -> tuple[str, str]:
    """The README's two kcat commands: (send one request, find its reply)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(echo '[^\n]*\|\n +kcat -P[^\n]*)\n(kcat -C[^\n]*)\n```", readme)
    assert block is not None, "the README's kcat example is gone"
    return block.group(1), block.group(2)


def in_shell(line: str, kcat: str) -> subprocess.CompletedProcess[str]:
    path = f"{Path(kcat).parent}:{os.environ['PATH']}"
    return subprocess.run(
        ["bash", "-c", f"set -o pipefail; {line}"],
        env=os.environ | {"PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def reply_lines(kcat: str, find: str, ids: set[str]) -> dict[str, str]:
    """Run ``find`` until each id's reply is among the lines it prints (``%h %s``: the
    headers, then the value); each id's value."""
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while True:
        found = {}
        for line in in_shell(find, kcat).stdout.splitlines():
            headers, _, payload = line.partition(" ")
            for cid in ids & {h.removeprefix("correlation-id=") for h in headers.split(",")}:
                found[cid] = payload
        if found.keys() == ids:
            return found
        assert time.monotonic() < deadline, f"no reply for {ids - found.keys()}"
        time.sleep(0.5)


async def test_kcat_with_its_defaults_as_the_readme_shows(service: Service) -> None:
    kcat = kcat_binary()
    send, find = readme_kcat_lines()
    readme_id, typo, not_json = (f"kcat-{uuid.uuid4().hex}" for _ in range(3))

    readme_body = send.split("'")[1]

    def ours(line: str, cid: str, body: str = readme_body) -> str:
        """The README's line on this test's broker and topics, with this id and body."""
        line = line.replace("localhost:9092", service.bootstrap).replace(readme_body, body)
        line = line.replace("rerank.requests", service.requests)
        return line.replace("rerank.replies", service.replies).replace("req-1", cid)

    for cid, body in ((readme_id, readme_body), (typo, json.dumps(TYPO)), (not_json, "{query")):
        sent = await asyncio.to_thread(in_shell, ours(send, cid, body), kcat)
        assert sent.returncode == 0, sent.stderr
    found = await asyncio.to_thread(
        reply_lines, kcat, ours(find, readme_id).split(" | grep")[0], {readme_id, typo, not_json}
    )
    grepped = await asyncio.to_thread(in_shell, ours(find, readme_id), kcat)
    assert grepped.returncode == 0 and grepped.stdout.count("\n") == 1, grepped
    result = json.loads(found[readme_id])
    REPLY_VALIDATOR.validate(result)
    assert result["id"] == readme_id
    assert_same_ranking(result, await sdk_ranking(service, json.loads(readme_body)))
    assert json.loads(found[typo])["error"]["code"] == "invalid_request"
    assert json.loads(found[not_json])["error"]["code"] == "invalid_request"
