"""The SDK over a real Kafka broker, answered by a fake of our own rerank service.

Tests that take ``rerank_service`` need only its ``bootstrap_servers``,
``request_topic`` and ``reply_topic``, so they hold for any service that follows the
wire contract: override that fixture to run them against the real worker. Tests that
take ``fake_service`` steer the fake's behaviour (silence, errors, duplicates).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from fake_rerank_service import MODEL_NAME, FakeRerankService, fake_score

from producer_sdk import (
    NO_RETRY,
    ClientClosed,
    ClientStartError,
    RerankClient,
    RerankErrorReply,
    RerankResult,
    RerankTimeout,
    RetryPolicy,
    SyncRerankClient,
    cli,
)
from schemas.models import (
    HEADER_CORRELATION_ID,
    HEADER_DEADLINE_MS,
    HEADER_REPLY_PARTITION,
    HEADER_REPLY_TOPIC,
)

REQUEST_PARTITIONS = 3
REPLY_PARTITIONS = 3
CONCURRENT_CALLS = 500
WAIT_FOR_COUNTERS_S = 15.0


class RerankService(Protocol):
    """Where a wire-contract rerank service listens and answers."""

    bootstrap_servers: str
    request_topic: str
    reply_topic: str


ClientFactory = Callable[..., Awaitable[RerankClient]]


@pytest.fixture
async def fake_service(kafka_bootstrap: str, new_topic: Any) -> AsyncIterator[FakeRerankService]:
    service = FakeRerankService(
        kafka_bootstrap,
        request_topic=await new_topic(partitions=REQUEST_PARTITIONS),
        reply_topic=await new_topic(partitions=REPLY_PARTITIONS),
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
def rerank_service(fake_service: FakeRerankService) -> RerankService:
    """The service under the SDK; swap point for end-to-end runs with the real worker."""
    return fake_service


@pytest.fixture
async def make_client(rerank_service: RerankService) -> AsyncIterator[ClientFactory]:
    """Factory of started clients pointed at ``rerank_service``; all closed at teardown."""
    clients: list[RerankClient] = []

    async def make(**options: Any) -> RerankClient:
        client = RerankClient(
            bootstrap_servers=rerank_service.bootstrap_servers,
            request_topic=rerank_service.request_topic,
            reply_topic=rerank_service.reply_topic,
            **{"default_timeout": 20.0, **options},
        )
        clients.append(client)
        await client.start()
        return client

    yield make
    for client in clients:
        await client.close()


def call_documents(call: int, count: int = 4) -> list[str]:
    """Documents that name the call they belong to."""
    return [f"call {call} document {n} about kafka and reranking" for n in range(count)]


def assert_ranking_of(result: RerankResult, documents: list[str]) -> None:
    """``result`` ranks exactly ``documents``: every index once, texts match, best first."""
    assert sorted(result.indices) == list(range(len(documents)))
    assert [item.document for item in result] == [documents[i] for i in result.indices]
    assert result.scores == sorted(result.scores, reverse=True)


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_FOR_COUNTERS_S):
        while not condition():
            await asyncio.sleep(0.05)


# -- routing ---------------------------------------------------------------------------


async def test_concurrent_calls_from_one_client_each_get_their_own_result(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    calls = [call_documents(call) for call in range(CONCURRENT_CALLS)]

    results = await asyncio.gather(
        *(
            client.rerank(f"query {call}", documents, return_documents=True)
            for call, documents in enumerate(calls)
        )
    )

    for result, documents in zip(results, calls, strict=True):
        assert_ranking_of(result, documents)
    assert len({result.id for result in results}) == CONCURRENT_CALLS
    assert client.pending_count == 0


async def test_scores_are_those_the_service_computed_for_this_request(
    fake_service: FakeRerankService, make_client: ClientFactory
) -> None:
    client = await make_client()
    documents = call_documents(7)

    result = await client.rerank("which document?", documents, top_n=2)

    expected = sorted((fake_score("which document?", doc) for doc in documents), reverse=True)
    assert result.scores == expected[:2]
    assert result.model == MODEL_NAME
    assert all(item.document is None for item in result)  # return_documents was off


async def test_two_clients_on_one_reply_partition_never_see_each_others_results(
    make_client: ClientFactory,
) -> None:
    first, second = await make_client(reply_partition=1), await make_client(reply_partition=1)
    calls_per_client = 100

    async def run(client: RerankClient, name: str) -> None:
        calls = [[f"{name} {c}-{n}" for n in range(3)] for c in range(calls_per_client)]
        results = await asyncio.gather(
            *(client.rerank(name, docs, return_documents=True) for docs in calls)
        )
        for result, documents in zip(results, calls, strict=True):
            assert_ranking_of(result, documents)

    await asyncio.gather(run(first, "first"), run(second, "second"))

    # Each read the other's replies from the shared partition, and ignored them.
    await wait_until(lambda: first.stats.foreign_replies_ignored == calls_per_client)
    await wait_until(lambda: second.stats.foreign_replies_ignored == calls_per_client)
    assert first.stats.replies_matched == second.stats.replies_matched == calls_per_client


async def test_request_carries_routing_and_deadline_headers(
    fake_service: FakeRerankService, make_client: ClientFactory
) -> None:
    client = await make_client()
    sent_at_ms = time.time() * 1000

    result = await client.rerank("headers please", ["one", "two"], timeout=10.0)

    (seen,) = [s for s in fake_service.seen if s.body["query"] == "headers please"]
    assert seen.headers[HEADER_CORRELATION_ID] == result.id == seen.body["id"]
    assert seen.key == result.id.encode()
    assert seen.headers[HEADER_REPLY_TOPIC] == fake_service.reply_topic
    assert int(seen.headers[HEADER_REPLY_PARTITION]) == client.reply_partition
    deadline_ms = int(seen.headers[HEADER_DEADLINE_MS])
    assert deadline_ms > seen.timestamp_ms  # in the future when the request was written
    assert sent_at_ms < deadline_ms <= time.time() * 1000 + 10_000


# -- failures --------------------------------------------------------------------------


async def test_timeout_raises_and_later_calls_still_work(
    fake_service: FakeRerankService, make_client: ClientFactory
) -> None:
    fake_service.behaviour.ignored_queries.add("nobody answers this")
    client = await make_client()

    with pytest.raises(RerankTimeout) as raised:
        await client.rerank("nobody answers this", ["a document"], timeout=0.5)

    assert raised.value.retriable
    assert client.pending_count == 0
    documents = call_documents(1)
    assert_ranking_of(await client.rerank("answer me", documents, return_documents=True), documents)


async def test_error_reply_raises_with_its_code(make_client: ClientFactory) -> None:
    client = await make_client()

    with pytest.raises(RerankErrorReply) as raised:
        await client.rerank("error:payload_too_large", ["a document"])

    assert raised.value.code == "payload_too_large"
    assert raised.value.retriable is False
    assert client.pending_count == 0


async def test_close_fails_every_pending_call_at_once(
    fake_service: FakeRerankService, make_client: ClientFactory
) -> None:
    fake_service.behaviour.ignored_queries.add("wait forever")
    call_timeout = 60.0
    client = await make_client()
    calls = [
        asyncio.create_task(client.rerank("wait forever", ["doc"], timeout=call_timeout))
        for _ in range(20)
    ]
    await wait_until(
        lambda: (
            len([s for s in fake_service.seen if s.body["query"] == "wait forever"]) == len(calls)
        )
    )

    await client.close()

    # Far less than the calls' own timeout: close ended them, not their timer.
    outcomes = await asyncio.wait_for(
        asyncio.gather(*calls, return_exceptions=True), timeout=call_timeout / 4
    )
    assert all(isinstance(outcome, ClientClosed) for outcome in outcomes)
    with pytest.raises(ClientClosed):
        await client.rerank("after close", ["doc"])


async def test_duplicate_replies_are_dropped(
    fake_service: FakeRerankService, make_client: ClientFactory
) -> None:
    fake_service.behaviour.duplicate_replies = True
    client = await make_client()
    calls = [call_documents(call, count=2) for call in range(50)]

    results = await asyncio.gather(
        *(client.rerank(f"twice {n}", docs, return_documents=True) for n, docs in enumerate(calls))
    )

    for result, documents in zip(results, calls, strict=True):
        assert_ranking_of(result, documents)
    await wait_until(lambda: client.stats.duplicates_dropped == len(calls))
    assert client.stats.replies_matched == len(calls)


# -- retries ---------------------------------------------------------------------------


async def test_an_unanswered_request_is_sent_again_with_its_correlation_id_and_answered(
    fake_service: FakeRerankService, make_client: ClientFactory
) -> None:
    """The first request of the call is lost; with a budget above the timeout the client
    sends it again, under the same correlation id, and the retry's reply is the result."""
    fake_service.behaviour.drop_first.add("lost once")
    client = await make_client(retry=RetryPolicy(budget=20.0))
    documents = call_documents(1)

    result = await client.rerank("lost once", documents, return_documents=True, timeout=1.0)

    assert_ranking_of(result, documents)
    first, second = [s for s in fake_service.seen if s.body["query"] == "lost once"]
    assert first.headers[HEADER_CORRELATION_ID] == second.headers[HEADER_CORRELATION_ID]
    assert first.body == second.body and result.id == first.body["id"]
    assert second.key == f"{result.id}.2".encode() != first.key  # likely another partition
    assert first.headers[HEADER_DEADLINE_MS] == second.headers[HEADER_DEADLINE_MS]
    assert client.stats.retries == 1 and client.stats.replies_matched == 1


async def test_a_late_reply_to_the_first_attempt_resolves_the_call_once(
    fake_service: FakeRerankService, make_client: ClientFactory
) -> None:
    """Both attempts get answered (the first late): one result, the other reply is dropped
    as a duplicate, as a reply repeated by the at-least-once service would be."""
    fake_service.behaviour.hold_first.add("answered late")
    client = await make_client(retry=RetryPolicy(budget=20.0))
    documents = call_documents(2)

    result = await client.rerank("answered late", documents, return_documents=True, timeout=1.0)

    assert_ranking_of(result, documents)
    sent = [s for s in fake_service.seen if s.body["query"] == "answered late"]
    assert len(sent) == 2 and {s.body["id"] for s in sent} == {result.id}
    await wait_until(lambda: client.stats.duplicates_dropped == 1)
    assert client.stats.replies_matched == 1 and client.pending_count == 0


async def test_a_retriable_error_reply_is_retried_within_the_calls_timeout(
    fake_service: FakeRerankService, make_client: ClientFactory
) -> None:
    """The default policy: no budget asked for, yet a retriable error is tried again."""
    fake_service.behaviour.fail_first.add("fails once")
    client = await make_client()
    started = time.monotonic()

    result = await client.rerank("fails once", ["a document"], timeout=10.0)

    assert time.monotonic() - started < 10.0
    assert [s.body["id"] for s in fake_service.seen if s.body["query"] == "fails once"] == [
        result.id,
        result.id,
    ]
    assert client.stats.retries == 1 and client.stats.replies_matched == 2


async def test_without_retries_the_retriable_error_reaches_the_caller(
    fake_service: FakeRerankService, make_client: ClientFactory
) -> None:
    fake_service.behaviour.fail_first.add("fails once, no retry")
    client = await make_client(retry=NO_RETRY)

    with pytest.raises(RerankErrorReply) as raised:
        await client.rerank("fails once, no retry", ["a document"])

    assert raised.value.code == "internal" and raised.value.retriable is True
    assert client.stats.retries == 0


async def test_start_fails_clearly_for_a_missing_topic(
    rerank_service: RerankService,
) -> None:
    client = RerankClient(
        bootstrap_servers=rerank_service.bootstrap_servers,
        request_topic=rerank_service.request_topic,
        reply_topic="no-such-topic-for-rerank-tests",
    )
    with pytest.raises(ClientStartError, match="no-such-topic-for-rerank-tests"):
        await client.start()


async def test_start_fails_clearly_for_a_missing_reply_partition(
    rerank_service: RerankService,
) -> None:
    client = RerankClient(
        bootstrap_servers=rerank_service.bootstrap_servers,
        request_topic=rerank_service.request_topic,
        reply_topic=rerank_service.reply_topic,
        reply_partition=REPLY_PARTITIONS,
    )
    with pytest.raises(ClientStartError, match="no partition"):
        await client.start()


# -- sync client and CLI ---------------------------------------------------------------


async def test_sync_client_blocks_until_the_result(rerank_service: RerankService) -> None:
    documents = call_documents(3)

    def use_sync_client() -> RerankResult:
        with SyncRerankClient(
            bootstrap_servers=rerank_service.bootstrap_servers,
            request_topic=rerank_service.request_topic,
            reply_topic=rerank_service.reply_topic,
        ) as client:
            return client.rerank("sync query", documents, return_documents=True)

    # The sync client owns its loop; run it off this test's loop, which must keep serving.
    result = await asyncio.to_thread(use_sync_client)

    assert_ranking_of(result, documents)


async def test_sync_client_passes_truncate_and_retry_through(
    fake_service: FakeRerankService,
) -> None:
    fake_service.behaviour.fail_first.add("sync, fails once")

    def use_sync_client() -> tuple[RerankResult, int]:
        with SyncRerankClient(
            bootstrap_servers=fake_service.bootstrap_servers,
            request_topic=fake_service.request_topic,
            reply_topic=fake_service.reply_topic,
            retry=NO_RETRY,
        ) as client:
            result = client.rerank(
                "sync, fails once", ["a"], truncate=False, retry=RetryPolicy(attempts=2)
            )
            return result, client.client.stats.retries

    result, retries = await asyncio.to_thread(use_sync_client)

    sent = [s for s in fake_service.seen if s.body["query"] == "sync, fails once"]
    assert [s.body["truncate"] for s in sent] == [False, False]
    assert retries == 1 and result.indices == [0]


async def test_cli_prints_the_ranking_as_json(
    rerank_service: RerankService, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--bootstrap-servers",
        rerank_service.bootstrap_servers,
        "--request-topic",
        rerank_service.request_topic,
        "--reply-topic",
        rerank_service.reply_topic,
        "--json",
        "cli query",
        "first document",
        "second document",
    ]

    status = await asyncio.to_thread(cli.main, argv)

    assert status == cli.EXIT_OK
    printed = orjson.loads(capsys.readouterr().out)
    assert sorted(r["index"] for r in printed["results"]) == [0, 1]
    assert {r["document"] for r in printed["results"]} == {"first document", "second document"}


async def test_cli_reports_an_error_reply_in_one_line(
    rerank_service: RerankService, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--bootstrap-servers",
        rerank_service.bootstrap_servers,
        "--request-topic",
        rerank_service.request_topic,
        "--reply-topic",
        rerank_service.reply_topic,
        "error:invalid_request",
        "a document",
    ]

    status = await asyncio.to_thread(cli.main, argv)

    assert status == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid_request" in err


async def test_client_reads_every_reply_written_after_start(
    rerank_service: RerankService, make_client: ClientFactory
) -> None:
    # The end offset is fixed inside start(): a record written right after start() returns
    # must be read. Were the seek lazy, the end could be taken after this record and skip it.
    producer = AIOKafkaProducer(bootstrap_servers=rerank_service.bootstrap_servers)
    await producer.start()
    try:
        await producer.partitions_for(rerank_service.reply_topic)  # metadata warm: send fast
        client = await make_client(reply_partition=0)
        await producer.send_and_wait(
            rerank_service.reply_topic,
            b"{}",
            partition=client.reply_partition,
            headers=[(HEADER_CORRELATION_ID, b"someone-else")],
        )
    finally:
        await producer.stop()

    await wait_until(lambda: client.stats.foreign_replies_ignored == 1)
