"""What the chaos scenarios are made of: a broker of their own with a listener behind
Toxiproxy, supervised worker processes, a steady stream of SDK requests, and a ledger
that reads the topics to count what was lost and what was answered twice.

Network faults only touch the workers: they reach the broker through Toxiproxy (the
broker's PROXIED listener advertises the proxy's port), while the test's own clients
(the SDK stream, the ledger, topic set-up) use its plain listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from producer_sdk import NO_RETRY, RerankClient, RerankError

REPO = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = REPO / "deploy" / "local" / "kafka"
CHAOS_WORKER = Path(__file__).with_name("chaos_worker.py")
PARTITIONS = 4
REPLY_PARTITIONS = 2
BROKER_START_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_port_pair() -> int:
    """A port ``p`` with ``p + 1`` free too (the broker's controller takes ``p + 1``)."""
    for _ in range(100):
        port = free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no two adjacent free ports")


# ------------------------------------------------------------------------- Toxiproxy


class Toxiproxy:
    """A Toxiproxy server of the test's own, driven over its HTTP API."""

    def __init__(self, binary: str) -> None:
        self.api_port = free_port()
        self._process = subprocess.Popen(
            [binary, "-host", "127.0.0.1", "-port", str(self.api_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self._call("GET", "/version")
                return
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError("toxiproxy-server did not start") from None
                time.sleep(0.05)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method
        )
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None

    def proxy(self, name: str, listen_port: int, upstream_port: int) -> None:
        self._call(
            "POST",
            "/proxies",
            {
                "name": name,
                "listen": f"127.0.0.1:{listen_port}",
                "upstream": f"127.0.0.1:{upstream_port}",
                "enabled": True,
            },
        )

    def add_toxic(self, proxy: str, name: str, kind: str, **attributes: Any) -> None:
        """A toxic on both directions' downstream stream (what the client receives)."""
        self._call(
            "POST",
            f"/proxies/{proxy}/toxics",
            {"name": name, "type": kind, "stream": "downstream", "attributes": attributes},
        )

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._call("DELETE", f"/proxies/{proxy}/toxics/{name}")

    def enable(self, proxy: str, enabled: bool) -> None:
        """Disabled: every connection through the proxy is closed and new ones refused."""
        self._call("POST", f"/proxies/{proxy}", {"enabled": enabled})

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(10)


# ---------------------------------------------------------------------------- broker


class ChaosBroker:
    """A broker of the chaos tests' own (``deploy/local/kafka``): a plain listener for
    the test, a PROXIED one behind Toxiproxy for the workers."""

    PROXY = "kafka"

    def __init__(self, state_dir: Path, toxiproxy: Toxiproxy) -> None:
        self.port = free_port_pair()
        self.proxied_port = free_port()
        self.proxy_port = free_port()
        self.state_dir = state_dir
        self.toxiproxy = toxiproxy
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")},
            "KAFKA_PORT": str(self.port),
            "KAFKA_PROXIED_PORT": str(self.proxied_port),
            "KAFKA_PROXIED_ADVERTISED_PORT": str(self.proxy_port),
            "KAFKA_STATE_DIR": str(state_dir),
            "KAFKA_HEAP_OPTS": "-Xms128m -Xmx768m",
            "KAFKA_START_TIMEOUT": str(BROKER_START_TIMEOUT_S),
        }
        toxiproxy.proxy(self.PROXY, self.proxy_port, self.proxied_port)

    @property
    def bootstrap(self) -> str:
        """The plain listener: the test's own clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def worker_bootstrap(self) -> str:
        """Through Toxiproxy: the workers."""
        return f"127.0.0.1:{self.proxy_port}"

    def _script(self, command: str) -> None:
        done = subprocess.run(
            [str(KAFKA_SCRIPT), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=BROKER_START_TIMEOUT_S + 30,
            check=False,
        )
        assert done.returncode == 0, f"kafka {command}: {done.stdout}{done.stderr}"

    def start(self) -> None:
        self._script("start")

    def stop(self) -> None:
        self._script("stop")

    @property
    def pid(self) -> int:
        return int((self.state_dir / "kafka.pid").read_text().strip())

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


@dataclass(frozen=True)
class ChaosTopics:
    requests: str
    replies: str
    dlq: str


async def make_topics(bootstrap: str) -> ChaosTopics:
    names = ChaosTopics(*(f"chaos-{uuid.uuid4().hex}" for _ in range(3)))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(names.requests, PARTITIONS, 1),
                NewTopic(names.replies, REPLY_PARTITIONS, 1),
                NewTopic(names.dlq, 1, 1),
            ]
        )
        async with asyncio.timeout(20):
            while True:
                described = await admin.describe_topics(list(vars(names).values()))
                if all(t["error_code"] == 0 and t["partitions"] for t in described):
                    return names
                await asyncio.sleep(0.1)
    finally:
        await admin.close()


# --------------------------------------------------------------------------- workers


@dataclass
class WorkerSlot:
    """One worker of the pool and its current process."""

    index: int
    http_port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restart: bool = True  # the supervisor restarts it when it exits
    exits: list[int] = field(default_factory=list)


class WorkerPool:
    """Worker processes under a supervisor that restarts the ones that exit (as
    systemd's Restart=always or compose's restart policy would)."""

    def __init__(self, broker: ChaosBroker, topics: ChaosTopics, log_dir: Path) -> None:
        self._broker = broker
        self.topics = topics
        self._log_dir = log_dir
        self.slots: list[WorkerSlot] = []
        self._supervisor: asyncio.Task[None] | None = None
        self.group = f"chaos-group-{uuid.uuid4().hex}"

    def add(self, **settings: Any) -> WorkerSlot:
        """A worker with ``settings`` (RERANK_* variables, lower-case names)."""
        index = len(self.slots)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "CHAOS_"))}
        env.update(
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            PYTHONUNBUFFERED="1",
            RERANK_BOOTSTRAP_SERVERS=self._broker.worker_bootstrap,
            RERANK_REQUEST_TOPIC=self.topics.requests,
            RERANK_REPLY_TOPIC=self.topics.replies,
            RERANK_DLQ_TOPIC=self.topics.dlq,
            RERANK_GROUP_ID=self.group,
            RERANK_HTTP_HOST="127.0.0.1",
            RERANK_LOG_FORMAT="text",
            RERANK_DRAIN_TIMEOUT_S="10",
        )
        slot = WorkerSlot(index, free_port(), env)
        slot.env["RERANK_HTTP_PORT"] = str(slot.http_port)
        for name, value in settings.items():
            key = name.upper() if name.startswith("chaos_") else f"RERANK_{name.upper()}"
            slot.env[key] = str(value)
        self.slots.append(slot)
        return slot

    def start(self, slot: WorkerSlot) -> None:
        log = (self._log_dir / f"worker-{slot.index}.log").open("ab")
        slot.process = subprocess.Popen(
            [sys.executable, str(CHAOS_WORKER)],
            cwd=REPO,
            env=slot.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    async def start_all(self) -> None:
        for slot in self.slots:
            self.start(slot)
        for slot in self.slots:
            await self.wait_ready(slot)
        self._supervisor = asyncio.create_task(self._supervise())

    async def wait_ready(self, slot: WorkerSlot, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(self.ready, slot):
            assert time.monotonic() < deadline, f"worker {slot.index} not ready in {timeout_s} s"
            await asyncio.sleep(0.2)

    def ready(self, slot: WorkerSlot) -> bool:
        try:
            url = f"http://127.0.0.1:{slot.http_port}/health/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            for slot in self.slots:
                process = slot.process
                if process is not None and process.poll() is not None:
                    slot.exits.append(process.returncode)
                    slot.process = None
                    if slot.restart:
                        await asyncio.sleep(0.5)
                        self.start(slot)

    def signal(self, slot: WorkerSlot, signum: int) -> None:
        if slot.process is not None and slot.process.poll() is None:
            slot.process.send_signal(signum)

    async def stop_all(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for slot in self.slots:
            slot.restart = False
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGCONT)
                slot.process.terminate()
        for slot in self.slots:
            if slot.process is not None:
                try:
                    await asyncio.to_thread(slot.process.wait, 60)
                except subprocess.TimeoutExpired:
                    slot.process.kill()
                slot.exits.append(slot.process.returncode)
                slot.process = None

    def crashes(self) -> int:
        return sum(1 for slot in self.slots for code in slot.exits if code not in (0, -15))

    def logs(self) -> str:
        return "\n".join(
            f"--- worker {p.stem}\n" + p.read_text(errors="replace")[-4000:]
            for p in sorted(self._log_dir.glob("worker-*.log"))
        )


# --------------------------------------------------------------------------- traffic


@dataclass
class TrafficReport:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    # (sent, answered) of each answered call, time.monotonic()
    answered: list[tuple[float, float]] = field(default_factory=list)

    @property
    def latencies_s(self) -> list[float]:
        """Each answered call's time from sending to its answer."""
        return [done - sent for sent, done in self.answered]

    def first_answer_after(self, moment: float) -> float | None:
        """When the first call was answered after ``moment`` (None: none was)."""
        return min((done for _, done in self.answered if done > moment), default=None)

    def last_answer_of_calls_sent_before(self, moment: float) -> float | None:
        """When the last call sent before ``moment`` was answered (None: none was)."""
        return max((done for sent, done in self.answered if sent < moment), default=None)


class Traffic:
    """A steady stream of SDK requests: ``rate`` a second while running."""

    def __init__(self, bootstrap: str, topics: ChaosTopics, rate: float, read_committed: bool):
        self._client = RerankClient(
            bootstrap,
            request_topic=topics.requests,
            reply_topic=topics.replies,
            default_timeout=120.0,
            read_committed=read_committed,
            # The ledger judges the service: each call is one request record, and a reply
            # more for a correlation id is a duplicate the service produced, not a retry.
            retry=NO_RETRY,
        )
        self._rate = rate
        self.report = TrafficReport()
        self._calls: set[asyncio.Task[None]] = set()
        self._running: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Traffic:
        await self._client.start()
        self._running = asyncio.create_task(self._send())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self._client.close()

    async def stop(self) -> None:
        """Stop sending; wait for every call in flight (each ends by its timeout)."""
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running
            self._running = None
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)

    async def _send(self) -> None:
        interval = 1.0 / self._rate
        next_at = time.monotonic()
        while True:
            task = asyncio.create_task(self._one(self.report.sent))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            self.report.sent += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _one(self, number: int) -> None:
        started = time.monotonic()
        try:
            await self._client.rerank(f"chaos query {number}", ["alpha", "beta", "gamma"])
        except RerankError as exc:
            self.report.errors[type(exc).__name__] += 1
            return
        self.report.ok += 1
        self.report.answered.append((started, time.monotonic()))


async def produce_raw(
    bootstrap: str, topic: str, records: list[tuple[str, dict[str, Any], dict[str, str]]]
) -> None:
    """Requests produced without the SDK: (correlation id, body, extra headers) each."""
    async with AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all") as producer:
        for correlation_id, body, headers in records:
            await producer.send_and_wait(
                topic,
                json.dumps(body).encode(),
                key=correlation_id.encode(),
                headers=[("correlation-id", correlation_id.encode())]
                + [(k, v.encode()) for k, v in headers.items()],
            )


# ---------------------------------------------------------------------------- ledger


@dataclass
class Ledger:
    """What the topics say: every request, every reply, every dead-letter record."""

    requests: list[str]
    replies: Counter[str]
    dead_letters: Counter[str]
    error_replies: int

    @property
    def lost(self) -> list[str]:
        """Requests with neither a reply nor a dead-letter record."""
        return [c for c in self.requests if c not in self.replies and c not in self.dead_letters]

    @property
    def duplicated(self) -> int:
        """Replies beyond the first for a request."""
        return sum(n - 1 for n in self.replies.values() if n > 1)


async def read_all(bootstrap: str, topic: str, partitions: int, isolation_level: str) -> list[Any]:
    """Every record of ``topic`` now (up to its end offsets)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation_level
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + 30
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


def correlation_id(record: Any) -> str:
    for name, value in record.headers or ():
        if name == "correlation-id" and value is not None:
            return str(bytes(value).decode())
    return ""


async def read_ledger(
    bootstrap: str,
    topics: ChaosTopics,
    read_committed: bool,
    extra_reply_topics: tuple[str, ...] = (),
) -> Ledger:
    isolation = "read_committed" if read_committed else "read_uncommitted"
    requests = await read_all(bootstrap, topics.requests, PARTITIONS, "read_uncommitted")
    replies = await read_all(bootstrap, topics.replies, REPLY_PARTITIONS, isolation)
    for topic in extra_reply_topics:
        with contextlib.suppress(Exception):  # a deleted topic has no replies left
            replies += await read_all(bootstrap, topic, 1, isolation)
    dead = await read_all(bootstrap, topics.dlq, 1, isolation)
    return Ledger(
        requests=[correlation_id(r) for r in requests],
        replies=Counter(correlation_id(r) for r in replies),
        dead_letters=Counter(correlation_id(r) for r in dead),
        error_replies=sum(1 for r in replies if b'"error"' in (r.value or b"")),
    )


async def wait_for_answers(
    bootstrap: str,
    topics: ChaosTopics,
    read_committed: bool,
    timeout_s: float,
    extra_reply_topics: tuple[str, ...] = (),
) -> Ledger:
    """The ledger once nothing is lost any more (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ledger = await read_ledger(bootstrap, topics, read_committed, extra_reply_topics)
        if not ledger.lost or time.monotonic() > deadline:
            return ledger
        await asyncio.sleep(1.0)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[random.Random]:
    yield random.Random(seed)


@contextlib.asynccontextmanager
async def pool_running(pool: WorkerPool) -> AsyncIterator[WorkerPool]:
    await pool.start_all()
    try:
        yield pool
    finally:
        await pool.stop_all()
