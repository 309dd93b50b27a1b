"""Fixtures for tests against a real Kafka broker.

The broker is the one named by env ``KAFKA_BOOTSTRAP`` when that is set. Otherwise the
session starts its own through ``deploy/local/kafka`` on port ``RERANK_TEST_KAFKA_PORT``
(default 29092, away from a dev broker on 9092) and stops it at the end, but only if this
session started it. The port lies below Linux's ephemeral range (32768-60999): a client
that dials a port in that range while nothing listens there can connect to itself, and
then holds the port the broker needs.
"""

import asyncio
import logging
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

log = logging.getLogger(__name__)

KAFKA_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "kafka"
DEFAULT_TEST_PORT = 29092
STATUS_RUNNING = 0
STATUS_NOT_RUNNING = 3
# A cold start downloads the broker jars first; stay below pytest-timeout's 300 s.
SCRIPT_TIMEOUT_S = 280
TOPIC_READY_TIMEOUT_S = 10.0
TOPIC_DELETE_TIMEOUT_S = 10.0


class TopicFactory(Protocol):
    """Creates a uuid-named topic and returns its name once every partition has a leader."""

    async def __call__(self, partitions: int = 1) -> str: ...


def _kafka_script(command: str, port: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KAFKA_PORT=str(port))
    # The test broker's controller port and state dir follow from its port; settings meant
    # for a dev broker must not leak in (a shared state dir would be wiped on start).
    env.pop("KAFKA_CONTROLLER_PORT", None)
    env.pop("KAFKA_STATE_DIR", None)
    return subprocess.run(
        [str(KAFKA_SCRIPT), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address ("host:port") of a running Kafka broker for this session."""
    configured = os.environ.get("KAFKA_BOOTSTRAP")
    if configured:
        yield configured
        return

    port = int(os.environ.get("RERANK_TEST_KAFKA_PORT", DEFAULT_TEST_PORT))
    status = _kafka_script("status", port)
    started_here = status.returncode == STATUS_NOT_RUNNING
    if started_here:
        _kafka_script("wipe", port)  # the test broker starts from empty data
        start = _kafka_script("start", port)
        if start.returncode != 0:
            pytest.fail(f"could not start the test broker: {start.stderr.strip()}", pytrace=False)
    elif status.returncode != STATUS_RUNNING:
        pytest.fail(f"test broker is not usable: {status.stdout.strip()}", pytrace=False)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if started_here:
            stop = _kafka_script("stop", port)
            if stop.returncode != 0:
                log.warning("stopping the test broker failed: %s", stop.stderr.strip())


@pytest.fixture(scope="session")
async def kafka_admin(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """One admin client for the whole session."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topic: str, partitions: int) -> None:
    # CreateTopics returns once the controller has the topic; the broker's metadata cache
    # may trail it by a moment, and clients that assign partitions by hand would then fail.
    async with asyncio.timeout(TOPIC_READY_TIMEOUT_S):
        while True:
            (described,) = await admin.describe_topics([topic])
            ready = [
                p for p in described["partitions"] if p["error_code"] == 0 and p["leader"] >= 0
            ]
            if described["error_code"] == 0 and len(ready) == partitions:
                return
            await asyncio.sleep(0.05)


@pytest.fixture
async def new_topic(kafka_admin: AIOKafkaAdminClient) -> AsyncIterator[TopicFactory]:
    """Factory: ``await new_topic(partitions=1)`` makes a fresh topic; deleted at teardown."""
    created: list[str] = []

    async def create(partitions: int = 1) -> str:
        name = f"test-{uuid.uuid4().hex}"
        response = await kafka_admin.create_topics([NewTopic(name, partitions, 1)])
        for topic, error_code, error_message in response.topic_errors:
            if error_code != 0:
                raise RuntimeError(f"creating topic {topic} failed: {error_code} {error_message}")
        created.append(name)
        await _wait_for_leaders(kafka_admin, name, partitions)
        return name

    yield create

    if created:
        try:
            await asyncio.wait_for(kafka_admin.delete_topics(created), TOPIC_DELETE_TIMEOUT_S)
        except Exception:  # best effort: a leftover uuid topic harms no later test
            log.warning("could not delete test topics %s", created, exc_info=True)


@pytest.fixture
def new_group() -> Callable[[], str]:
    """Factory: ``new_group()`` returns a fresh consumer group id."""

    def create() -> str:
        return f"test-group-{uuid.uuid4().hex}"

    return create
