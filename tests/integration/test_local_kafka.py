"""``deploy/local/kafka``: start, status, a second start, stop, restart, wipe, and failures.

The lifecycle test runs a real broker of its own (free ports, its own state dir) beside
whatever broker the session uses. The failure tests start none: each must end in one
clear line on stderr and a non-zero exit before a broker would be started.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

KAFKA_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "kafka"
STATUS_NOT_RUNNING = 3
# A JVM broker on 2 busy cores; well below pytest-timeout's limit.
START_TIMEOUT_S = 150
SCRIPT_TIMEOUT_S = 200
SMALL_HEAP = "-Xms64m -Xmx512m"


def kafka(command: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
    return subprocess.run(
        [str(KAFKA_SCRIPT), command, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )


def free_port_pair() -> int:
    """A port ``p`` with ``p`` and ``p + 1`` (the controller's) both free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no two adjacent free ports")


def path_without(tools: Path, *names: str) -> str:
    """A PATH holding every command of this one except ``names``."""
    tools.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = tools / entry.name
            if entry.name in names or target.exists() or not os.access(entry.path, os.X_OK):
                continue
            target.symlink_to(entry.path)
    return str(tools)


def assert_one_line_error(done: subprocess.CompletedProcess[str], complaint: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("kafka: error: ")
    assert complaint in done.stderr


def pid_of(output: str) -> int:
    match = re.search(r"\(pid (\d+)\)", output)
    assert match, output
    return int(match.group(1))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def own_broker_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Settings of a broker for this test alone; stopped at teardown whatever happened."""
    env = {
        "KAFKA_PORT": str(free_port_pair()),
        "KAFKA_STATE_DIR": str(tmp_path / "state"),
        "KAFKA_HEAP_OPTS": SMALL_HEAP,
        "KAFKA_START_TIMEOUT": str(START_TIMEOUT_S),
    }
    yield env
    kafka("stop", **env)


def test_start_status_second_start_and_stop(own_broker_env: dict[str, str]) -> None:
    port = own_broker_env["KAFKA_PORT"]
    pid_file = Path(own_broker_env["KAFKA_STATE_DIR"]) / "kafka.pid"

    started = kafka("start", **own_broker_env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"127.0.0.1:{port}" in started.stdout
    pid = pid_of(started.stdout)
    assert alive(pid)
    log_file = Path(own_broker_env["KAFKA_STATE_DIR"]) / "broker.log"
    assert "Kafka Server started" in log_file.read_text()  # its log goes to the file

    status = kafka("status", **own_broker_env)
    assert status.returncode == 0, status.stdout
    assert f"running (pid {pid}), bootstrap 127.0.0.1:{port}" in status.stdout

    again = kafka("start", **own_broker_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"already running (pid {pid})" in again.stdout and "nothing changed" in again.stdout
    assert pid_file.read_text().strip() == str(pid)
    assert "Kafka Server started" in log_file.read_text()  # not truncated by a restart

    stopped = kafka("stop", **own_broker_env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"stopped (pid {pid})" in stopped.stdout
    assert not alive(pid)
    assert not pid_file.exists()
    assert kafka("status", **own_broker_env).returncode == STATUS_NOT_RUNNING


async def test_a_restart_keeps_topics_and_offsets_and_wipe_deletes_them(
    own_broker_env: dict[str, str],
) -> None:
    bootstrap = f"127.0.0.1:{own_broker_env['KAFKA_PORT']}"
    tp = TopicPartition("kept-topic", 0)
    assert kafka("start", **own_broker_env).returncode == 0
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(tp.topic, 1, 1)])
    finally:
        await admin.close()
    async with AIOKafkaProducer(bootstrap_servers=bootstrap) as producer:
        await producer.send_and_wait(tp.topic, b"kept", partition=0)
    await commit_offset(bootstrap, tp, 1)

    assert kafka("stop", **own_broker_env).returncode == 0
    restarted = kafka("start", **own_broker_env)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert await committed_offset(bootstrap, tp) == 1  # the group's offset survived
    assert tp.topic in await topic_names(bootstrap)

    refused = kafka("wipe", **own_broker_env)
    assert_one_line_error(refused, "the broker is running")
    assert kafka("stop", **own_broker_env).returncode == 0
    wiped = kafka("wipe", **own_broker_env)
    assert wiped.returncode == 0 and "wiped" in wiped.stdout, wiped.stdout + wiped.stderr
    assert kafka("start", **own_broker_env).returncode == 0
    assert tp.topic not in await topic_names(bootstrap)


async def commit_offset(bootstrap: str, tp: TopicPartition, offset: int) -> None:
    async with AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="kept-group") as consumer:
        consumer.assign([tp])
        await consumer.commit({tp: offset})


async def committed_offset(
    bootstrap: str, tp: TopicPartition, timeout_s: float = 20.0
) -> int | None:
    """The group's committed offset, once the restarted broker answers with one: just
    after a start the topic may still be loading, which reads as "none"."""
    async with AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="kept-group") as consumer:
        deadline = time.monotonic() + timeout_s
        while (committed := await consumer.committed(tp)) is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.2)
        return committed


async def topic_names(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


def test_start_on_a_taken_port_fails_in_one_line(tmp_path: Path) -> None:
    port = free_port_pair()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()

        done = kafka("start", KAFKA_PORT=str(port), KAFKA_STATE_DIR=str(tmp_path / "state"))

    assert_one_line_error(done, f"port 127.0.0.1:{port} is already in use")
    assert not (tmp_path / "state" / "kafka.pid").exists()


def test_start_without_java_fails_in_one_line(tmp_path: Path) -> None:
    done = kafka(
        "start",
        KAFKA_PORT=str(free_port_pair()),
        KAFKA_STATE_DIR=str(tmp_path / "state"),
        PATH=path_without(tmp_path / "tools", "java"),
    )

    assert_one_line_error(done, "java not found on PATH")


def test_first_use_without_maven_fails_in_one_line(tmp_path: Path) -> None:
    done = kafka(
        "fetch",
        RERANK_CACHE_DIR=str(tmp_path / "cache"),
        PATH=path_without(tmp_path / "tools", "mvn"),
    )

    assert_one_line_error(done, "Maven (mvn) is needed")


def test_a_failed_download_fails_in_one_line_and_caches_nothing(tmp_path: Path) -> None:
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "mvn").write_text("#!/bin/sh\necho 'Could not transfer artifact' >&2\nexit 1\n")
    (failing / "mvn").chmod(0o755)
    cache = tmp_path / "cache"

    done = kafka(
        "fetch",
        RERANK_CACHE_DIR=str(cache),
        PATH=f"{failing}{os.pathsep}{os.environ['PATH']}",
    )

    assert_one_line_error(done, "downloading Kafka jars with Maven failed")
    assert not list(cache.glob("kafka-*/libs"))  # a later start downloads again
    assert "Could not transfer artifact" in next(cache.glob("kafka-*/fetch.log")).read_text()


def test_status_names_a_broker_it_did_not_start(kafka_bootstrap: str, tmp_path: Path) -> None:
    """The session's broker, seen from another state dir: exit 5, so demo.sh reuses it."""
    port = kafka_bootstrap.rsplit(":", 1)[1]
    status = kafka(
        "status", KAFKA_PORT=port, RERANK_CACHE_DIR=str(tmp_path), KAFKA_STATE_DIR=str(tmp_path)
    )
    assert status.returncode == 5, status.stdout + status.stderr
    assert "another broker answers" in status.stdout + status.stderr


async def test_topics_runs_kafkas_topic_tool_against_this_broker(
    kafka_bootstrap: str, kafka_admin: AIOKafkaAdminClient
) -> None:
    port = kafka_bootstrap.rsplit(":", 1)[1]
    topic = f"test-{uuid.uuid4().hex}"
    created = await asyncio.to_thread(
        kafka, "topics", "--create", "--topic", topic, "--partitions", "2", KAFKA_PORT=port
    )
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == f"Created topic {topic}."
    try:
        listed = await asyncio.to_thread(kafka, "topics", KAFKA_PORT=port)  # no ARGS: --list
        assert topic in listed.stdout.splitlines()
        (described,) = await kafka_admin.describe_topics([topic])
        assert len(described["partitions"]) == 2
    finally:
        await kafka_admin.delete_topics([topic])


def test_topics_without_a_broker_fails_in_one_line(tmp_path: Path) -> None:
    port = free_port_pair()
    done = kafka("topics", KAFKA_PORT=str(port), KAFKA_STATE_DIR=str(tmp_path / "state"))
    assert_one_line_error(done, f"no broker answers on 127.0.0.1:{port}")
