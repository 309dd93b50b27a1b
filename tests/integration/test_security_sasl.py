"""Kafka security against a real broker that requires a SASL login.

The module starts a broker of its own through ``deploy/local/kafka`` with
``KAFKA_SASL_PORT`` set: one PLAINTEXT listener (topics are created there) and one
SASL_PLAINTEXT listener that knows one user under PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512. The real worker (``consumer.service.worker.Worker``, fake engine) and the SDK
talk to each other over the SASL listener only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaError
from pydantic import SecretStr
from test_local_kafka import (
    SMALL_HEAP,
    START_TIMEOUT_S,
    assert_one_line_error,
    free_port_pair,
    kafka,
)
from worker_harness import (
    FakeEngine,
    Topics,
    fake_score,
    fresh_metrics,
    running_worker,
    topics_on,
    wait_until,
    worker_config,
)

from consumer.app import EXIT_FAILED, Parts, Service, make_kafka_worker
from consumer.service.worker import Worker
from consumer.settings import Settings, settings_from
from producer_sdk import ClientStartError, KafkaSecurity, RerankClient, RerankResult

pytestmark = pytest.mark.integration

MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
USER = "rerank"
# Unique per run, so finding it in a log can only mean this test's secret leaked.
PASSWORD = f"pw-{uuid.uuid4().hex}"
WRONG_PASSWORD = f"wrong-{uuid.uuid4().hex}"
# Bounds, not timings: a login failure is answered at once, these only stop a hang.
FAIL_WITHIN_S = 30.0
CALL_TIMEOUT_S = 30.0
TOPIC_READY_S = 10.0


def free_port_besides(taken: set[int]) -> int:
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in taken:
            return port
    raise RuntimeError("no free port")


@contextlib.contextmanager
def script_broker(**env: str) -> Iterator[subprocess.CompletedProcess[str]]:
    """A broker started by ``deploy/local/kafka`` with ``env``, stopped afterwards."""
    started = kafka("start", **env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield started
    finally:
        kafka("stop", **env)


def start_beside_a_taken_port(
    tmp_path: Path, variable: str
) -> tuple[subprocess.CompletedProcess[str], int]:
    """``kafka start`` with listener ``variable`` on a port another socket holds."""
    port = free_port_pair()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = int(holder.getsockname()[1])
        done = kafka(
            "start",
            KAFKA_PORT=str(port),
            **{variable: str(taken)},
            KAFKA_STATE_DIR=str(tmp_path / "state"),
        )
    return done, taken


async def rerank_through_a_worker(
    bootstrap: str, topics: Topics, security: KafkaSecurity, label: str
) -> tuple[str, list[str], RerankResult, bool]:
    """One SDK call answered by a real worker (fake engine), both using ``security``.

    Returns the query, the documents, the result and whether the worker was in its group.
    """
    config = worker_config(bootstrap, topics, f"test-group-{uuid.uuid4().hex}", security=security)
    query, docs = f"which one? ({label})", ["red apples", "green pears", "blue sky"]
    async with (
        running_worker(config, FakeEngine()) as worker,
        RerankClient(
            bootstrap,
            request_topic=topics.requests,
            reply_topic=topics.replies,
            security=security,
            default_timeout=CALL_TIMEOUT_S,
        ) as client,
    ):
        in_group = worker.in_group
        result = await client.rerank(query, docs)
    return query, docs, result, in_group


class SaslBroker:
    """Addresses of the module's broker: PLAINTEXT for set-up, SASL for the code under test."""

    def __init__(self, plain_port: int, sasl_port: int, state_dir: Path) -> None:
        self.plaintext = f"127.0.0.1:{plain_port}"
        self.sasl = f"127.0.0.1:{sasl_port}"
        self.state_dir = state_dir


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SaslBroker]:
    port = free_port_pair()
    sasl_port = free_port_besides({port, port + 1})
    state_dir = tmp_path_factory.mktemp("sasl-broker") / "state"
    with script_broker(
        KAFKA_PORT=str(port),
        KAFKA_SASL_PORT=str(sasl_port),
        KAFKA_SASL_USERS=f"{USER}:{PASSWORD}",
        KAFKA_STATE_DIR=str(state_dir),
        KAFKA_HEAP_OPTS=SMALL_HEAP,
        KAFKA_START_TIMEOUT=str(START_TIMEOUT_S),
    ) as started:
        assert f"SASL_PLAINTEXT 127.0.0.1:{sasl_port}" in started.stdout
        yield SaslBroker(port, sasl_port, state_dir)


@pytest.fixture(scope="module")
async def sasl_topics(sasl_broker: SaslBroker) -> AsyncIterator[Topics]:
    """Request, reply and dead-letter topics, created over the PLAINTEXT listener."""
    async with topics_on(sasl_broker.plaintext, TOPIC_READY_S) as topics:
        yield topics


def sasl(mechanism: str, password: str = PASSWORD) -> KafkaSecurity:
    return KafkaSecurity(
        protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_username=USER,
        sasl_password=SecretStr(password),
    )


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_worker_answers_the_sdk_over_sasl(
    mechanism: str,
    sasl_broker: SaslBroker,
    sasl_topics: Topics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    query, docs, result, in_group = await rerank_through_a_worker(
        sasl_broker.sasl, sasl_topics, sasl(mechanism), mechanism
    )
    assert in_group
    scores = {item.index: item.score for item in result.results}
    assert scores == pytest.approx({i: fake_score(query, None, d) for i, d in enumerate(docs)})
    assert PASSWORD not in caplog.text  # DEBUG logs of aiokafka, the worker and the SDK


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_sdk_with_a_wrong_password_fails_to_start(
    mechanism: str, sasl_broker: SaslBroker, sasl_topics: Topics
) -> None:
    client = RerankClient(
        sasl_broker.sasl,
        request_topic=sasl_topics.requests,
        reply_topic=sasl_topics.replies,
        security=sasl(mechanism, WRONG_PASSWORD),
        start_timeout=FAIL_WITHIN_S,
    )
    with pytest.raises(ClientStartError) as failed:
        await asyncio.wait_for(client.start(), FAIL_WITHIN_S + 5)

    message = str(failed.value)
    assert "authentication failed" in message.lower(), message
    assert WRONG_PASSWORD not in message


async def test_worker_with_a_wrong_password_never_becomes_ready(
    sasl_broker: SaslBroker, sasl_topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = worker_config(
        sasl_broker.sasl,
        sasl_topics,
        f"test-group-{uuid.uuid4().hex}",
        security=sasl("SCRAM-SHA-512", WRONG_PASSWORD),
    )
    worker = Worker(config, FakeEngine(), fresh_metrics())
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(task.done, FAIL_WITHIN_S, "the worker to give up")
    finally:
        worker.request_stop()
    failure = task.exception()
    assert isinstance(failure, KafkaError)
    assert "authentication failed" in str(failure).lower(), failure
    assert not worker.in_group and not worker.ready
    assert WRONG_PASSWORD not in caplog.text


def service_settings(broker: SaslBroker, topics: Topics, password: str) -> Settings:
    return settings_from(
        {
            "bootstrap_servers": broker.sasl,
            "request_topic": topics.requests,
            "reply_topic": topics.replies,
            "dlq_topic": topics.dlq,
            "group_id": f"test-group-{uuid.uuid4().hex}",
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": USER,
            "sasl_password": password,
            "http_host": "127.0.0.1",
            "http_port": 0,
        }
    )


class _FakeModel:
    name = "fake-model"
    device = "cpu"


def fake_model_parts() -> Parts:
    """The real Kafka worker behind a fake model and engine."""

    def load(_settings: Settings) -> Any:
        return _FakeModel()

    def engine(*_args: Any) -> Any:
        return FakeEngine()

    return Parts(load_model=load, make_engine=engine, make_worker=make_kafka_worker)


async def test_service_reports_a_login_failure_in_one_line(
    sasl_broker: SaslBroker, sasl_topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    """The service as ``python -m consumer`` runs it: exit 1, one error, no traceback."""
    caplog.set_level(logging.INFO)
    settings = service_settings(sasl_broker, sasl_topics, WRONG_PASSWORD)
    service = Service(settings, fake_model_parts(), fresh_metrics())

    code = await asyncio.wait_for(service.run(), FAIL_WITHIN_S)

    assert code == EXIT_FAILED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    ours = [r for r in errors if r.name.startswith("consumer.")]
    assert len(ours) == 1, [r.getMessage() for r in errors]
    assert "authentication failed" in ours[0].getMessage().lower(), ours[0].getMessage()
    assert all(r.exc_info is None for r in errors)
    assert WRONG_PASSWORD not in caplog.text


def test_the_password_is_never_shown_by_settings() -> None:
    settings = service_settings(
        SaslBroker(1, 2, Path()), Topics(requests="r", replies="p", dlq="d"), PASSWORD
    )
    security = settings.kafka_security()
    shown = [
        repr(settings),
        str(settings),
        str(settings.masked()),
        repr(security),
        repr(settings.worker_config()),
    ]
    for text in shown:
        assert PASSWORD not in text
    assert security.aiokafka_kwargs()["sasl_plain_password"] == PASSWORD  # still usable


def test_the_broker_script_keeps_the_passwords_out_of_its_log(sasl_broker: SaslBroker) -> None:
    state = sasl_broker.state_dir
    assert PASSWORD not in (state / "broker.log").read_text()
    assert (state / "server.properties").stat().st_mode & 0o077 == 0  # owner only


@pytest.mark.parametrize("users", ["rerank", "rerank:", 'rerank:pass"word', "bad name:pw"])
def test_script_refuses_bad_sasl_users_in_one_line(users: str, tmp_path: Path) -> None:
    port = free_port_pair()
    done = kafka(
        "start",
        KAFKA_PORT=str(port),
        KAFKA_SASL_PORT=str(free_port_besides({port, port + 1})),
        KAFKA_SASL_USERS=users,
        KAFKA_STATE_DIR=str(tmp_path / "state"),
    )
    assert_one_line_error(done, "must be user:password")
    assert not (tmp_path / "state" / "kafka.pid").exists()


def test_script_refuses_a_taken_sasl_port_in_one_line(tmp_path: Path) -> None:
    done, sasl_port = start_beside_a_taken_port(tmp_path, "KAFKA_SASL_PORT")
    assert_one_line_error(done, f"SASL port 127.0.0.1:{sasl_port} is already in use")
