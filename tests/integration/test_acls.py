"""The documented least-privilege ACLs, enforced by a broker with KRaft's StandardAuthorizer.

The broker (its own, ``KAFKA_AUTHORIZER=on``) authorizes every SASL login; the PLAINTEXT
listener's anonymous principal is its super user, used here only to create topics and
ACLs. The worker and the SDK log in as their own principals with exactly the ACLs of
docs/operations.md ("Kafka ACLs") and nothing more:

* a request answered through the SDK, in both delivery modes;
* a worker whose allow pattern is wrongly wide cannot write into a topic the ACLs do not
  grant, even when a request names it: the request is dead-lettered instead;
* a missing ACL (the consumer group's) ends the worker's start with one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)
from pydantic import SecretStr
from test_local_kafka import SMALL_HEAP, START_TIMEOUT_S, free_port_pair
from test_security_sasl import free_port_besides, script_broker
from worker_harness import (
    FakeEngine,
    Request,
    Topics,
    dlq_reader,
    fresh_metrics,
    produce,
    request,
    running_worker,
    worker_config,
)

from consumer.app import EXIT_FAILED, Parts, Service, make_kafka_worker
from consumer.settings import settings_from
from producer_sdk import NO_RETRY, KafkaSecurity, RerankClient, RerankError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WORKER, CLIENT = "rerank-worker", "rerank-client"
PASSWORDS = {WORKER: f"w-{uuid.uuid4().hex}", CLIENT: f"c-{uuid.uuid4().hex}"}
TXN_PREFIX = "rerank"


@dataclass(frozen=True)
class AclBroker:
    plaintext: str  # super user (anonymous): set-up only
    sasl: str  # every principal here is authorized by ACLs


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclBroker]:
    port = free_port_pair()
    sasl_port = free_port_besides({port, port + 1})
    users = ",".join(f"{user}:{password}" for user, password in PASSWORDS.items())
    env = {
        "KAFKA_PORT": str(port),
        "KAFKA_SASL_PORT": str(sasl_port),
        "KAFKA_SASL_USERS": users,
        "KAFKA_AUTHORIZER": "on",
        "KAFKA_STATE_DIR": str(tmp_path_factory.mktemp("acl-broker") / "state"),
        "KAFKA_HEAP_OPTS": SMALL_HEAP,
        "KAFKA_START_TIMEOUT": str(START_TIMEOUT_S),
    }
    with script_broker(**env):
        yield AclBroker(f"127.0.0.1:{port}", f"127.0.0.1:{sasl_port}")


def login(user: str) -> KafkaSecurity:
    return KafkaSecurity(
        protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=user,
        sasl_password=SecretStr(PASSWORDS[user]),
    )


def documented_acls(prefix: str, group: str) -> list[AclBinding]:
    """docs/operations.md, "Kafka ACLs", for topics named ``<prefix>.requests`` etc."""

    def allow(
        user: str,
        kind: ResourceType,
        name: str,
        operation: AclOperation,
        pattern: ResourcePatternType = ResourcePatternType.LITERAL,
    ) -> AclBinding:
        return AclBinding(
            kind, name, pattern, f"User:{user}", "*", operation, AclPermissionType.ALLOW
        )

    topic, prefixed = ResourceType.TOPIC, ResourcePatternType.PREFIXED
    requests, replies, dlq = f"{prefix}.requests", f"{prefix}.replies", f"{prefix}.requests.dlq"
    read, write, describe = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE
    return [
        # the workers
        allow(WORKER, topic, requests, read),
        allow(WORKER, topic, requests, describe),
        allow(WORKER, ResourceType.GROUP, group, read),
        allow(WORKER, topic, replies, write),
        allow(WORKER, topic, replies, describe),
        allow(WORKER, topic, f"{replies}.", write, prefixed),
        allow(WORKER, topic, f"{replies}.", describe, prefixed),
        allow(WORKER, topic, dlq, write),
        allow(WORKER, topic, dlq, describe),
        # exactly-once mode only: the partitions' transactional ids
        allow(WORKER, ResourceType.TRANSACTIONAL_ID, f"{TXN_PREFIX}.", write, prefixed),
        allow(WORKER, ResourceType.TRANSACTIONAL_ID, f"{TXN_PREFIX}.", describe, prefixed),
        # the producers (the SDK): send requests, read their reply topic
        allow(CLIENT, topic, requests, write),
        allow(CLIENT, topic, requests, describe),
        allow(CLIENT, topic, replies, read),
        allow(CLIENT, topic, replies, describe),
    ]


@contextlib.asynccontextmanager
async def acl_setup(
    broker: AclBroker,
    leave_out: AclOperation | None = None,
    without: Callable[[AclBinding], bool] = lambda acl: False,
) -> AsyncIterator[tuple[Topics, str, str]]:
    """Topics and the documented ACLs (but those of ``leave_out`` on the group, and those
    ``without`` picks)."""
    prefix = f"acl-{uuid.uuid4().hex[:12]}"
    group = f"{prefix}-workers"
    names = [
        f"{prefix}.requests",
        f"{prefix}.replies",
        f"{prefix}.requests.dlq",
        f"secret-{prefix}",
    ]
    admin = AdminClient({"bootstrap.servers": broker.plaintext})
    acls = [
        acl
        for acl in documented_acls(prefix, group)
        if not (leave_out is not None and acl.restype == ResourceType.GROUP) and not without(acl)
    ]
    await asyncio.to_thread(_create, admin, names, acls)
    yield Topics(names[0], names[1], names[2]), group, names[3]


def _create(admin: AdminClient, topics: list[str], acls: list[AclBinding]) -> None:
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in topics]).values():
        future.result(30)
    for future in admin.create_acls(acls).values():
        future.result(30)
    _wait_until_the_authorizer_has(admin, acls)


def _wait_until_the_authorizer_has(admin: AdminClient, acls: list[AclBinding]) -> None:
    """ACLs reach the broker's authorizer through the metadata log, a moment after
    create_acls returns; a client that logs in meanwhile is refused (an idempotent
    producer's start fails with ClusterAuthorizationFailed, seen in the suite)."""
    wanted = {(a.restype, a.name, a.principal, a.operation) for a in acls}
    everything = AclBindingFilter(
        ResourceType.ANY,
        None,
        ResourcePatternType.ANY,
        None,
        None,
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = admin.describe_acls(everything).result(30)
        if wanted <= {(a.restype, a.name, a.principal, a.operation) for a in seen}:
            return
        time.sleep(0.2)
    raise AssertionError("the broker never showed the ACLs just created")


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_the_sdk_ranks_through_a_worker_with_only_the_documented_acls(
    acl_broker: AclBroker, delivery: str
) -> None:
    async with acl_setup(acl_broker) as (topics, group, _secret):
        config = worker_config(
            acl_broker.sasl,
            topics,
            group,
            security=login(WORKER),
            allowed_reply_topics=None,
            delivery=delivery,
            transactional_id_prefix=TXN_PREFIX,
        )
        async with (
            running_worker(config, FakeEngine()),
            RerankClient(
                acl_broker.sasl,
                request_topic=topics.requests,
                reply_topic=topics.replies,
                security=login(CLIENT),
                read_committed=delivery == "exactly_once",
                default_timeout=60,
            ) as client,
        ):
            result = await client.rerank("which one?", ["red apples", "green pears"])
    assert sorted(result.indices) == [0, 1]


async def test_the_broker_refuses_a_reply_topic_the_acls_do_not_grant(
    acl_broker: AclBroker,
) -> None:
    """The worker's own pattern wrongly allows every topic; the broker still does not."""
    async with acl_setup(acl_broker) as (topics, group, secret):
        config = worker_config(
            acl_broker.sasl, topics, group, security=login(WORKER), allowed_reply_topics=".*"
        )
        sneaky = request("c-sneaky", {"query": "q", "documents": ["a"]}, reply_topic=secret)
        async with (
            dlq_reader(acl_broker.plaintext, topics) as dead,
            running_worker(config, FakeEngine()),
        ):
            await produce(acl_broker.plaintext, topics.requests, [sneaky])
            (record,) = await dead.read(1)
        assert record.headers["error-code"] == b"invalid_request"
        secret_records = await _count(acl_broker.plaintext, secret)
    assert secret_records == 0


async def _count(bootstrap: str, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    async with AIOKafkaConsumer(bootstrap_servers=bootstrap) as consumer:
        tp = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([tp]))[tp])


class _Model:
    name = "fake-model"
    device = "cpu"


def worker_service(broker: AclBroker, topics: Topics, group: str, **settings: Any) -> Service:
    """The worker's service as ``python -m consumer`` runs it, logged in as the worker."""
    values = {
        "bootstrap_servers": broker.sasl,
        "request_topic": topics.requests,
        "reply_topic": topics.replies,
        "dlq_topic": topics.dlq,
        "group_id": group,
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": WORKER,
        "sasl_password": PASSWORDS[WORKER],
        "transactional_id_prefix": TXN_PREFIX,
        "http_host": "127.0.0.1",
        "http_port": 0,
        **settings,
    }
    parts = Parts(
        load_model=lambda _s: _Model(),  # type: ignore[arg-type,return-value]
        make_engine=lambda *_a: FakeEngine(),
        make_worker=make_kafka_worker,
    )
    return Service(settings_from(values), parts, fresh_metrics())


def one_error_line(caplog: pytest.LogCaptureFixture) -> str:
    ours = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("consumer.")
    ]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    return ours[0].getMessage()


async def test_a_missing_acl_is_one_clear_line(
    acl_broker: AclBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with acl_setup(acl_broker, leave_out=AclOperation.READ) as (topics, group, _):
        code = await asyncio.wait_for(worker_service(acl_broker, topics, group).run(), 120)
    assert code == EXIT_FAILED
    message = one_error_line(caplog)
    assert "group" in message.lower() and "authoriz" in message.lower(), message


def _transactional(acl: AclBinding) -> bool:
    return acl.restype == ResourceType.TRANSACTIONAL_ID


async def test_exactly_once_without_its_transactional_id_acls_stops_with_one_line(
    acl_broker: AclBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """It used to stay ready and answer every request into its outbox, whose
    transactions could never commit: 2,000 answers held in memory for nobody."""
    caplog.set_level(logging.INFO)
    # a prefix of its own: the other tests' transactional-id ACLs (never deleted) cover
    # TXN_PREFIX's ids
    unauthorized = f"unauthorized-{uuid.uuid4().hex[:8]}"
    async with acl_setup(acl_broker, without=_transactional) as (topics, group, _):
        service = worker_service(
            acl_broker,
            topics,
            group,
            delivery="exactly_once",
            transactional_id_prefix=unauthorized,
        )
        running = asyncio.create_task(service.run())
        requests = [request(f"c-{i}", {"query": "q", "documents": ["a"]}) for i in range(50)]
        await produce(acl_broker.plaintext, topics.requests, requests)
        code = await asyncio.wait_for(running, 120)
    assert code == EXIT_FAILED
    message = one_error_line(caplog)
    assert "transactional" in message.lower() and "authoriz" in message.lower(), message


async def test_a_reply_topic_the_worker_may_describe_but_not_write_dead_letters(
    acl_broker: AclBroker,
) -> None:
    """A refusal for good of the reply: the request goes to the dead-letter topic with
    the broker's reason, and its partition goes on."""
    async with acl_setup(acl_broker, without=_write_on_replies) as (topics, group, _):
        config = worker_config(
            acl_broker.sasl, topics, group, security=login(WORKER), allowed_reply_topics=None
        )
        async with (
            dlq_reader(acl_broker.plaintext, topics) as dead,
            running_worker(config, FakeEngine()),
        ):
            await produce(
                acl_broker.plaintext,
                topics.requests,
                [request("c-1", {"query": "q", "documents": ["a"]})],
            )
            (record,) = await dead.read(1)
    assert record.headers["error-code"] == b"internal"
    assert b"Authorization" in (record.headers["error-message"] or b"")


def _write_on_replies(acl: AclBinding) -> bool:
    return (
        acl.name.endswith(".replies")
        and acl.operation == AclOperation.WRITE
        and acl.principal == f"User:{WORKER}"
    )


def _write_on_dlq(acl: AclBinding) -> bool:
    return acl.name.endswith(".requests.dlq") and acl.operation == AclOperation.WRITE


async def test_a_dead_letter_topic_the_worker_may_not_write_stops_it_with_one_line(
    acl_broker: AclBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Retrying cannot help a refusal for good: the record was retried for ever, its
    partition held, nobody told. Now: one line, exit 1, the record uncommitted."""
    caplog.set_level(logging.INFO)
    async with acl_setup(acl_broker, without=_write_on_dlq) as (topics, group, _):
        service = worker_service(acl_broker, topics, group)
        running = asyncio.create_task(service.run())
        await produce(acl_broker.plaintext, topics.requests, [Request(value=b"no id")])
        code = await asyncio.wait_for(running, 120)
    assert code == EXIT_FAILED
    message = one_error_line(caplog)
    assert "dead-letter" in message and "WRITE" in message, message


async def test_a_client_refused_the_request_topic_gets_a_clear_error_at_once(
    acl_broker: AclBroker,
) -> None:
    """The caller's own principal lacks WRITE on the request topic: the call fails fast
    with the broker's reason, instead of waiting out its timeout."""

    def client_write(acl: AclBinding) -> bool:
        return acl.principal == f"User:{CLIENT}" and acl.operation == AclOperation.WRITE

    async with (
        acl_setup(acl_broker, without=client_write) as (topics, _group, _),
        RerankClient(
            acl_broker.sasl,
            request_topic=topics.requests,
            reply_topic=topics.replies,
            security=login(CLIENT),
            default_timeout=60,
        ) as client,
    ):
        started = time.monotonic()
        with pytest.raises(RerankError) as caught:
            await client.rerank("q", ["a"], retry=NO_RETRY)
    assert time.monotonic() - started < 30
    assert "Authorization" in str(caught.value), caught.value
