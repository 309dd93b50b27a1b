"""rerank-gateway as users meet it: the real binary, a real broker, a worker, and HTTP
clients no one here wrote (the ``cohere`` SDK, LangChain's ``CohereRerank`` in a venv of its
own, and aiohttp for TEI's plain HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import cohere
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cohere.core.api_error import ApiError
from cohere.errors import (
    BadRequestError,
    ServiceUnavailableError,
    TooManyRequestsError,
    UnauthorizedError,
)
from worker_harness import (
    MODEL_NAME,
    FakeEngine,
    TopicFactory,
    TopicReader,
    expected_order,
    fake_score,
    make_topics,
    running_worker,
    worker_config,
)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = Path(sys.executable).with_name("rerank-gateway")
TOKEN = "test-token"
START_TIMEOUT_S = 30.0
QUERY = "what is kafka?"
DOCUMENTS = ["a novelist from Prague", "Kafka is a distributed event log", "a log", "kafka"]
NO_RETRIES: Any = {"max_retries": 0}  # cohere retries 429 and 5xx by default


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def running_gateway(
    bootstrap: str, requests: str, replies: str, group: str, *flags: str, token: str | None = TOKEN
) -> AsyncIterator[str]:
    """The ``rerank-gateway`` console script in a process; yields its base URL once ready."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's code
    env.pop("RERANK_GATEWAY_API_TOKEN", None)
    if token is not None:
        env["RERANK_GATEWAY_API_TOKEN"] = token
    args = [str(GATEWAY), "--bootstrap-servers", bootstrap, "--port", str(port)]
    args += ["--request-topic", requests, "--reply-topic", replies, "--group-id", group, *flags]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert code == 0, f"the gateway exited {code}: {log}"


async def _wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(START_TIMEOUT_S):
        while True:
            assert proc.poll() is None, f"the gateway exited: {proc.stderr and proc.stderr.read()}"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/health/ready") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def gateway_with_worker(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
    *flags: str,
    engine: FakeEngine | None = None,
    token: str | None = TOKEN,
) -> AsyncIterator[str]:
    topics = await make_topics(new_topic)
    group = new_group()
    config = worker_config(kafka_bootstrap, topics, group)
    async with (
        running_worker(config, engine or FakeEngine()),
        running_gateway(
            kafka_bootstrap, topics.requests, topics.replies, group, *flags, token=token
        ) as url,
    ):
        yield url


def _expected(query: str = QUERY, instruction: str | None = None) -> list[int]:
    return expected_order(query, instruction, DOCUMENTS)


async def test_the_cohere_sdk_ranks_through_the_gateway(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    async with gateway_with_worker(kafka_bootstrap, new_topic, new_group) as url:
        co = cohere.AsyncClientV2(api_key=TOKEN, base_url=url)
        ranked = await co.rerank(model=MODEL_NAME, query=QUERY, documents=DOCUMENTS, top_n=3)

        v1 = cohere.Client(api_key=TOKEN, base_url=url)
        objects = [{"text": d, "source": f"s{i}"} for i, d in enumerate(DOCUMENTS)]
        v1_ranked = await asyncio.to_thread(
            v1.rerank, model=MODEL_NAME, query=QUERY, documents=objects, return_documents=True
        )

    assert [r.index for r in ranked.results] == _expected()[:3]
    for result in ranked.results:
        assert result.relevance_score == pytest.approx(
            fake_score(QUERY, None, DOCUMENTS[result.index])
        )
    assert [r.index for r in v1_ranked.results] == _expected()
    first = v1_ranked.results[0]
    assert first.document is not None
    assert first.document.text == DOCUMENTS[first.index]
    assert first.document.source == f"s{first.index}"  # type: ignore[attr-defined]


async def test_the_cohere_sdk_sees_each_error_as_cohere_reports_it(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    flags = ("--max-body-bytes", "2000")
    async with gateway_with_worker(kafka_bootstrap, new_topic, new_group, *flags) as url:
        co = cohere.AsyncClientV2(api_key=TOKEN, base_url=url)
        with pytest.raises(BadRequestError) as bad:
            await co.rerank(model=MODEL_NAME, query=QUERY, documents=DOCUMENTS, top_n=0)
        with pytest.raises(BadRequestError) as empty:
            await co.rerank(model=MODEL_NAME, query="", documents=DOCUMENTS)
        with pytest.raises(ApiError) as too_large:
            await co.rerank(model=MODEL_NAME, query=QUERY, documents=["x" * 3000])
        stranger = cohere.AsyncClientV2(api_key="wrong", base_url=url)
        with pytest.raises(UnauthorizedError):
            await stranger.rerank(model=MODEL_NAME, query=QUERY, documents=DOCUMENTS)

    assert "top_n" in bad.value.body["message"]
    assert "query" in empty.value.body["message"]
    assert too_large.value.status_code == 413


async def test_no_worker_is_503_with_retry_after_at_once(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    topics = await make_topics(new_topic)
    args = (kafka_bootstrap, topics.requests, topics.replies, new_group())
    async with running_gateway(*args, "--check-workers", "0.5", "--timeout", "20") as url:
        co = cohere.AsyncClientV2(api_key=TOKEN, base_url=url)
        async with asyncio.timeout(5):  # not the 20 s call timeout: the group is empty
            with pytest.raises(ServiceUnavailableError) as unavailable:
                await co.rerank(
                    model=MODEL_NAME, query=QUERY, documents=DOCUMENTS, request_options=NO_RETRIES
                )
    assert unavailable.value.headers is not None
    assert unavailable.value.headers["retry-after"] == "1"
    assert "no rerank worker" in unavailable.value.body["message"]


async def test_no_reply_in_time_is_503(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    # Workers there but slower than the gateway's timeout.
    slow = FakeEngine(delay_s=3.0)
    flags = ("--timeout", "0.5")
    async with gateway_with_worker(
        kafka_bootstrap, new_topic, new_group, *flags, engine=slow
    ) as url:
        co = cohere.AsyncClientV2(api_key=TOKEN, base_url=url)
        with pytest.raises(ServiceUnavailableError) as unavailable:
            await co.rerank(
                model=MODEL_NAME, query=QUERY, documents=DOCUMENTS, request_options=NO_RETRIES
            )
    assert "no reply" in unavailable.value.body["message"]


async def test_calls_past_max_concurrency_get_429(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    slow = FakeEngine(delay_s=1.0)
    flags = ("--max-concurrency", "1")
    async with gateway_with_worker(
        kafka_bootstrap, new_topic, new_group, *flags, engine=slow
    ) as url:
        co = cohere.AsyncClientV2(api_key=TOKEN, base_url=url)

        async def call() -> Any:
            return await co.rerank(
                model=MODEL_NAME, query=QUERY, documents=DOCUMENTS, request_options=NO_RETRIES
            )

        first = asyncio.create_task(call())
        await asyncio.sleep(0.3)  # the first is in flight, waiting on the slow engine
        with pytest.raises(TooManyRequestsError) as overloaded:
            await call()
        assert [r.index for r in (await first).results] == _expected()
    assert overloaded.value.headers is not None
    assert overloaded.value.headers["retry-after"] == "1"


# LangChain's Cohere reranker pins an older cohere SDK (<6) than this project's tests use,
# so it runs in a venv of its own, as in a RAG application that has it.
LANGCHAIN_COHERE = "langchain-cohere==0.6.0"
LANGCHAIN_CALL = """
import json, sys
from langchain_cohere import CohereRerank
from langchain_core.documents import Document

url, token, model, query, *texts = sys.argv[1:]
reranker = CohereRerank(base_url=url, cohere_api_key=token, model=model)  # its defaults
documents = [Document(page_content=t, metadata={"position": i}) for i, t in enumerate(texts)]
kept = reranker.compress_documents(documents, query)
print(json.dumps([[d.metadata["position"], d.metadata["relevance_score"]] for d in kept]))
"""


def _run(*args: str | Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def langchain_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("langchain") / "venv"
    made = _run(sys.executable, "-m", "venv", venv, timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    pip = (python, "-m", "pip", "install", "-q", "--disable-pip-version-check")
    installed = _run(*pip, LANGCHAIN_COHERE, timeout=400)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return python


@pytest.mark.timeout(500)
async def test_langchains_cohere_reranker_ranks_through_the_gateway(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
    langchain_python: Path,
) -> None:
    async with gateway_with_worker(kafka_bootstrap, new_topic, new_group) as url:
        args = (langchain_python, "-c", LANGCHAIN_CALL, url, TOKEN, MODEL_NAME, QUERY, *DOCUMENTS)
        called = await asyncio.to_thread(_run, *args, timeout=120)
    assert called.returncode == 0, called.stderr[-3000:]
    kept = orjson.loads(called.stdout)
    assert [position for position, _ in kept] == _expected()[:3]  # CohereRerank's top_n: 3
    for position, score in kept:
        assert score == pytest.approx(fake_score(QUERY, None, DOCUMENTS[position]))


async def test_tei_and_native_shapes_over_plain_http(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    engine = FakeEngine()
    instruction = "Find the software"
    async with (
        gateway_with_worker(
            kafka_bootstrap, new_topic, new_group, engine=engine, token=None
        ) as url,
        aiohttp.ClientSession() as http,
    ):
        tei_body = {"query": QUERY, "texts": DOCUMENTS, "return_text": True, "truncate": True}
        async with http.post(f"{url}/rerank", json=tei_body) as response:
            assert response.status == 200
            tei = await response.json()
        async with http.post(f"{url}/rerank", json={"query": QUERY, "texts": []}) as response:
            tei_invalid = (response.status, await response.json())
        native_body = {"query": QUERY, "documents": DOCUMENTS, "instruction": instruction}
        async with http.post(f"{url}/rerank", json=native_body | {"top_n": 2}) as response:
            assert response.status == 200
            native = await response.json()
        typo = native_body | {"topn": 2}
        async with http.post(f"{url}/rerank", json=typo) as response:
            native_invalid = (response.status, await response.json())
        async with http.post(f"{url}/rerank", data=b"{not json") as response:
            not_json = (response.status, await response.json())
        async with http.get(f"{url}/metrics") as response:
            metrics = await response.text()

    assert [r["index"] for r in tei] == _expected()
    assert all(r["text"] == DOCUMENTS[r["index"]] for r in tei)
    assert tei_invalid == (400, {"error": "`texts` cannot be empty", "error_type": "Empty"})
    assert [r["index"] for r in native["results"]] == _expected(QUERY, instruction)[:2]
    assert native["model"] == MODEL_NAME
    assert set(native) >= {"id", "usage", "timing_ms"}
    assert engine.seen == [QUERY, QUERY], "the instruction reached the worker with the query"
    assert native_invalid[0] == 422
    assert native_invalid[1]["error"]["code"] == "invalid_request"
    assert "topn: unknown field" in native_invalid[1]["error"]["message"]
    assert not_json[0] == 400 and not_json[1]["error_type"] == "Validation"  # TEI owns /rerank
    assert 'rerank_gateway_requests_total{api="tei",status="200"} 1.0' in metrics
    assert 'rerank_gateway_requests_total{api="native",status="422"} 1.0' in metrics


async def test_the_callers_trace_context_goes_on_to_the_worker(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    """An HTTP caller inside a trace: its ``traceparent`` reaches the request record, so
    the worker's spans join the caller's trace (the gateway itself traces nothing)."""
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    topics = await make_topics(new_topic)
    group = new_group()
    async with (
        running_worker(worker_config(kafka_bootstrap, topics, group), FakeEngine()),
        running_gateway(kafka_bootstrap, topics.requests, topics.replies, group, token=None) as url,
        aiohttp.ClientSession() as http,
    ):
        body = {"query": QUERY, "documents": DOCUMENTS}
        async with http.post(f"{url}/rerank", json=body, headers={"traceparent": traceparent}):
            pass
        async with http.post(f"{url}/rerank", json=body) as response:
            assert response.status == 200  # a caller in no trace
    async with TopicReader(kafka_bootstrap, topics.requests, 1) as requests:
        traced, untraced = await requests.read(2)
    assert traced.headers["traceparent"] == traceparent.encode()
    assert "traceparent" not in untraced.headers


KAFKA_SCRIPT = ROOT / "deploy" / "local" / "kafka"
BROKER_START_TIMEOUT_S = 150


def _kafka(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
    return subprocess.run(
        [str(KAFKA_SCRIPT), command],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=BROKER_START_TIMEOUT_S + 30,
        check=False,
    )


def _free_port_pair() -> int:
    """A port p with p and p + 1 (a broker's controller port) both free."""
    for _ in range(100):
        port = _free_port()
        with contextlib.suppress(OSError), socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", port))
            b.bind(("127.0.0.1", port + 1))
            return port
    raise RuntimeError("no two adjacent free ports")


async def _ready_status(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(f"{url}/health/ready") as response:
        return response.status, await response.json()


@pytest.mark.timeout(300)
async def test_a_gateway_started_before_kafka_becomes_ready_once_kafka_is_there(
    tmp_path: Path,
) -> None:
    """Compose or Kubernetes may start the gateway first: with the default worker watch on
    (``--check-workers`` 5 s), it serves 503, reports not ready, and gets ready when the
    broker and its topics come, instead of exiting."""
    broker = {
        "KAFKA_PORT": str(_free_port_pair()),
        "KAFKA_STATE_DIR": str(tmp_path / "kafka"),
        "KAFKA_HEAP_OPTS": "-Xms64m -Xmx512m",
        "KAFKA_START_TIMEOUT": str(BROKER_START_TIMEOUT_S),
    }
    bootstrap = f"127.0.0.1:{broker['KAFKA_PORT']}"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env["PYTHONPATH"] = str(ROOT)
    args = [str(GATEWAY), "--bootstrap-servers", bootstrap, "--port", str(port)]
    args += ["--request-topic", "rerank.requests", "--reply-topic", "rerank.replies"]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(START_TIMEOUT_S):
                while True:
                    assert proc.poll() is None, "the gateway exited without Kafka"
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{url}/health/live") as live:
                            if live.status == 200:
                                break
                    await asyncio.sleep(0.1)
            await asyncio.sleep(2.0)  # long enough for a first connection attempt to fail
            assert proc.poll() is None, "the gateway exited without Kafka"
            assert await _ready_status(session, url) == (
                503,
                {"status": "not_ready", "reasons": ["not connected to Kafka"]},
            )
            body = {"query": QUERY, "documents": DOCUMENTS}
            async with session.post(f"{url}/v2/rerank", json=body) as call:
                assert call.status == 503
                assert call.headers["Retry-After"] == "1"

            started = await asyncio.to_thread(_kafka, "start", broker)
            assert started.returncode == 0, started.stderr
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                topics = [NewTopic("rerank.requests", 1, 1), NewTopic("rerank.replies", 1, 1)]
                await admin.create_topics(topics)
            finally:
                await admin.close()
            async with asyncio.timeout(60):
                while (await _ready_status(session, url))[0] != 200:
                    assert proc.poll() is None, "the gateway exited"
                    await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        assert proc.stderr is not None
        log = proc.stderr.read()
        await asyncio.to_thread(_kafka, "stop", broker)
    assert code == 0, log
    assert "Traceback" not in log, log


async def _answer_twice_in_transactions(bootstrap: str, requests: str) -> None:
    """A stand-in exactly-once worker: answers the first request with a reply in a
    transaction it then aborts (a worker that dies before its commit), then with another
    in one that commits."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(requests, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"test-{os.getpid()}-{id(requests)}"
    )
    await consumer.start()
    await producer.start()
    try:
        record = await consumer.getone()
        headers = dict(record.headers)
        correlation_id = headers["correlation-id"].decode()
        topic = headers["reply-topic"].decode()
        partition = int(headers["reply-partition"].decode())

        def reply(score: float) -> bytes:
            results = [{"index": 0, "relevance_score": score}]
            return orjson.dumps(
                {
                    "id": correlation_id,
                    "model": "m",
                    "results": results,
                    "usage": {"prompt_tokens": 1},
                    "timing_ms": {"queue": 0, "inference": 0, "total": 0},
                }
            )

        for score, commit in ((0.111, False), (0.999, True)):
            await producer.begin_transaction()
            await producer.send_and_wait(
                topic,
                reply(score),
                key=correlation_id.encode(),
                partition=partition,
                headers=[("correlation-id", correlation_id.encode())],
            )
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()
        await consumer.stop()


async def test_the_gateway_never_answers_from_a_transaction_that_was_aborted(
    kafka_bootstrap: str, new_topic: TopicFactory, new_group: Callable[[], str]
) -> None:
    """With exactly-once workers a reply is real only once its transaction commits. The
    gateway read replies uncommitted: it answered with the aborted one."""
    topics = await make_topics(new_topic)
    async with running_gateway(
        kafka_bootstrap, topics.requests, topics.replies, new_group(), "--check-workers", "0"
    ) as url:
        worker = asyncio.create_task(
            _answer_twice_in_transactions(kafka_bootstrap, topics.requests)
        )
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{url}/v2/rerank",
                json={"model": "m", "query": QUERY, "documents": ["a"]},
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as response,
        ):
            answer = await response.json()
        await worker
    assert response.status == 200, answer
    assert answer["results"] == [{"index": 0, "relevance_score": 0.999}]
