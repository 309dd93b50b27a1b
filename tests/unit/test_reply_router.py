"""Reply routing: the allow pattern, missing topics and partitions, one lookup per burst."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Collection

import pytest

from consumer.service.codec import ReplyRoute
from consumer.service.reply_router import (
    ClientTopicLookup,
    Destination,
    ReplyRouter,
    Unresolved,
    Unroutable,
)
from schemas.models import ErrorCode

DEFAULT = "rerank.replies"
ALLOWED = re.compile(r"rerank\.replies(\..+)?")


class FakeLookup:
    """Topics the 'cluster' has; ``known`` is what the producer's metadata already holds."""

    def __init__(self, cluster: dict[str, int], known: set[str] | None = None) -> None:
        self.cluster = cluster
        self.known = known if known is not None else set()
        self.fetches: list[str] = []
        self.delay_s = 0.0
        self.fail: Exception | None = None

    def known_partitions(self, topic: str) -> Collection[int] | None:
        if topic in self.known and topic in self.cluster:
            return range(self.cluster[topic])
        return None

    async def fetch_partitions(self, topic: str) -> Collection[int] | None:
        self.fetches.append(topic)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        if topic not in self.cluster:
            return None
        self.known.add(topic)
        return range(self.cluster[topic])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_router(lookup: FakeLookup, clock: Clock | None = None, wait_s: float = 1.0) -> ReplyRouter:
    return ReplyRouter(DEFAULT, ALLOWED, lookup, wait_s, 5.0, clock or Clock())


async def test_default_route_goes_to_the_default_topic_without_a_lookup() -> None:
    lookup = FakeLookup({DEFAULT: 3}, known={DEFAULT})
    router = make_router(lookup)
    assert await router.resolve(ReplyRoute()) == Destination(DEFAULT, None)
    assert await router.resolve(ReplyRoute(None, 2)) == Destination(DEFAULT, 2)
    assert lookup.fetches == []


async def test_a_topic_outside_the_pattern_is_refused_without_a_lookup() -> None:
    lookup = FakeLookup({"payments": 1}, known={"payments"})
    router = make_router(lookup)
    for topic in ("payments", "rerank.repliesX", "xrerank.replies"):
        result = await router.resolve(ReplyRoute(topic))
        assert isinstance(result, Unroutable)
        assert result.code is ErrorCode.INVALID_REQUEST
        assert "not allowed" in result.message
    assert lookup.fetches == []


async def test_an_allowed_topic_not_yet_known_is_looked_up_once() -> None:
    lookup = FakeLookup({"rerank.replies.team-a": 2})
    router = make_router(lookup)
    route = ReplyRoute("rerank.replies.team-a", 1)
    assert await router.resolve(route) == Destination("rerank.replies.team-a", 1)
    assert await router.resolve(route) == Destination("rerank.replies.team-a", 1)
    assert lookup.fetches == ["rerank.replies.team-a"]


async def test_a_missing_topic_is_unroutable_and_remembered_until_the_answer_expires() -> None:
    clock = Clock()
    lookup = FakeLookup({})
    router = make_router(lookup, clock)
    route = ReplyRoute("rerank.replies.gone")
    for _ in range(3):
        result = await router.resolve(route)
        assert isinstance(result, Unroutable)
        assert "does not exist" in result.message
    assert lookup.fetches == ["rerank.replies.gone"]

    lookup.cluster["rerank.replies.gone"] = 1  # created later
    clock.now += 4.9
    assert isinstance(await router.resolve(route), Unroutable)
    clock.now += 0.2
    assert await router.resolve(route) == Destination("rerank.replies.gone", None)
    assert lookup.fetches == ["rerank.replies.gone"] * 2


async def test_a_burst_for_a_missing_topic_shares_one_lookup() -> None:
    lookup = FakeLookup({})
    lookup.delay_s = 0.05
    router = make_router(lookup)
    results = await asyncio.gather(
        *(router.resolve(ReplyRoute("rerank.replies.gone")) for _ in range(50))
    )
    assert all(isinstance(r, Unroutable) for r in results)
    assert lookup.fetches == ["rerank.replies.gone"]


async def test_a_lookup_slower_than_the_wait_is_no_verdict_and_is_not_remembered() -> None:
    lookup = FakeLookup({"rerank.replies.slow": 1})
    lookup.delay_s = 5.0
    router = make_router(lookup, wait_s=0.05)
    route = ReplyRoute("rerank.replies.slow")
    result = await asyncio.wait_for(router.resolve(route), 2.0)
    assert isinstance(result, Unresolved)
    assert "timed out" in result.message
    lookup.delay_s = 0.0  # the broker answers again: asked at once, found
    assert await router.resolve(route) == Destination("rerank.replies.slow", None)
    assert lookup.fetches == ["rerank.replies.slow"] * 2


async def test_a_failing_lookup_is_no_verdict() -> None:
    lookup = FakeLookup({"rerank.replies.x": 1})
    lookup.fail = RuntimeError("broker unreachable")
    router = make_router(lookup)
    result = await router.resolve(ReplyRoute("rerank.replies.x"))
    assert isinstance(result, Unresolved) and "broker unreachable" in result.message
    lookup.fail = None
    assert await router.resolve(ReplyRoute("rerank.replies.x")) == Destination(
        "rerank.replies.x", None
    )


async def test_topic_memories_are_bounded_by_least_recent_use() -> None:
    """Reply topic names come from requests: a flood of names cannot grow memory."""
    lookup = FakeLookup({f"rerank.replies.t{i}": 1 for i in range(50)})
    router = ReplyRouter(DEFAULT, ALLOWED, lookup, 1.0, 5.0, Clock(), max_topics=10)
    for i in range(50):
        await router.resolve(ReplyRoute(f"rerank.replies.t{i}"))
    for i in range(50):  # names that do not exist are remembered (as missing) too
        await router.resolve(ReplyRoute(f"rerank.replies.missing{i}"))
    assert router.remembered_topics <= 20
    fetched = len(lookup.fetches)
    await router.resolve(ReplyRoute("rerank.replies.missing49"))  # recent: still remembered
    assert len(lookup.fetches) == fetched
    await router.resolve(ReplyRoute("rerank.replies.missing0"))  # forgotten: asked again
    assert len(lookup.fetches) == fetched + 1


@pytest.mark.parametrize("partition", [3, 99])
async def test_a_partition_out_of_range_is_unroutable(partition: int) -> None:
    lookup = FakeLookup({DEFAULT: 3}, known={DEFAULT})
    router = make_router(lookup)
    result = await router.resolve(ReplyRoute(None, partition))
    assert isinstance(result, Unroutable)
    assert f"partition {partition} does not exist" in result.message
    assert "3 partition(s)" in result.message


async def test_a_partition_added_later_is_found_after_a_fresh_lookup() -> None:
    clock = Clock()
    lookup = FakeLookup({DEFAULT: 2}, known={DEFAULT})
    router = make_router(lookup, clock)
    assert isinstance(await router.resolve(ReplyRoute(None, 2)), Unroutable)
    lookup.cluster[DEFAULT] = 4
    lookup.known.discard(DEFAULT)  # the producer's metadata has not caught up yet
    clock.now += 10
    assert await router.resolve(ReplyRoute(None, 2)) == Destination(DEFAULT, 2)


async def test_a_cancelled_caller_does_not_cancel_the_shared_lookup() -> None:
    lookup = FakeLookup({"rerank.replies.a": 1})
    lookup.delay_s = 0.05
    router = make_router(lookup)
    first = asyncio.create_task(router.resolve(ReplyRoute("rerank.replies.a")))
    second = asyncio.create_task(router.resolve(ReplyRoute("rerank.replies.a")))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == Destination("rerank.replies.a", None)
    assert lookup.fetches == ["rerank.replies.a"]


async def test_a_new_partition_of_a_known_topic_is_found_without_waiting() -> None:
    lookup = FakeLookup({DEFAULT: 2}, known={DEFAULT})
    router = make_router(lookup)
    assert await router.resolve(ReplyRoute(None, 1)) == Destination(DEFAULT, 1)
    lookup.cluster[DEFAULT] = 4  # partitions added; the producer's metadata is stale
    lookup.known.discard(DEFAULT)
    assert await router.resolve(ReplyRoute(None, 3)) == Destination(DEFAULT, 3)
    assert lookup.fetches == [DEFAULT]


class CountingClient:
    """An aiokafka client's metadata calls, counted; no topic exists."""

    def __init__(self) -> None:
        self.fetches = 0
        self.cluster = self

    def partitions_for_topic(self, topic: str) -> None:
        return None

    async def fetch_all_metadata(self) -> CountingClient:
        self.fetches += 1
        await asyncio.sleep(0.01)
        return self


async def test_requests_naming_many_new_missing_topics_cost_few_metadata_fetches(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each request naming a new, allowed but missing reply topic cost a metadata fetch of
    the whole cluster and a warning line: cheap requests, costly answers."""
    client = CountingClient()
    router = ReplyRouter(
        "rerank.replies",
        re.compile(r"rerank\.replies(\..+)?"),
        ClientTopicLookup(client, min_interval_s=0.2),
        wait_s=5.0,
        answer_ttl_s=10.0,
    )
    with caplog.at_level(logging.WARNING):
        answers = await asyncio.gather(
            *(router.resolve(ReplyRoute(f"rerank.replies.n{i}")) for i in range(100))
        )
    assert all(isinstance(a, Unroutable) for a in answers)
    assert client.fetches <= 2
    missing = [r for r in caplog.records if "does not exist" in r.getMessage()]
    assert len(missing) == 1


async def test_a_lookup_waits_for_a_fetch_that_starts_after_it_asked() -> None:
    """Fresh answers: a topic created a moment ago is found, even right after a fetch."""
    client = CountingClient()
    lookup = ClientTopicLookup(client, min_interval_s=0.1)
    assert await lookup.fetch_partitions("a") is None
    started = time.monotonic()
    assert await lookup.fetch_partitions("b") is None
    assert client.fetches == 2 and time.monotonic() - started >= 0.05
