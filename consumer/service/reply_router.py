"""Where a reply may go: the allow pattern, and whether the topic and partition exist.

A request names its reply topic, so the worker checks two things before producing:
the topic matches the allow pattern (a request cannot make the worker write into
someone else's topic), and the topic and partition exist. A producer asked to send to
a missing topic waits for its metadata for its whole request timeout; doing that per
record would stall the worker, so the router asks the cluster once, within a bounded
wait, and remembers the answer for a short while (a topic created later is found
once the memory expires). Known topics are remembered the same way, which keeps the
per-reply cost to a dictionary lookup.

Only the cluster's answer is a verdict: a lookup that fails or times out (the broker is
away) says nothing about the topic, so it is :class:`Unresolved` and not remembered; the
caller tries again later. Topic names come from requests, so both memories are bounded
(least recently used names go first).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from consumer.service.codec import ReplyRoute
from schemas.models import ErrorCode

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Destination:
    """A checked reply destination; ``partition=None`` lets the producer choose by key."""

    topic: str
    partition: int | None


@dataclass(frozen=True, slots=True)
class Unroutable:
    """Why a reply cannot be delivered: the record goes to the dead-letter topic."""

    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class Unresolved:
    """The cluster could not be asked now (error or timeout): no verdict, try again later."""

    message: str


Route = Destination | Unroutable | Unresolved
# Distinct reply topic names remembered at most (each memory): names come from requests.
DEFAULT_MAX_TOPICS = 4096
# Cluster metadata is fetched at most this often, however many new topic names requests
# bring: each name is cheap to send and its lookup is not.
MIN_FETCH_INTERVAL_S = 1.0
# A line about missing reply topics at most this often (with how many there were).
_MISSING_LOG_EVERY_S = 60.0


class _Occasional:
    """Counts occurrences and says when to log: the first, then once per interval."""

    def __init__(self, every_s: float, clock: Callable[[], float]) -> None:
        self._every_s = every_s
        self._clock = clock
        self._last: float | None = None
        self._since_last = 0

    def count(self) -> int | None:
        """None: stay quiet; else log, with this many occurrences since the last line."""
        self._since_last += 1
        now = self._clock()
        if self._last is not None and now - self._last < self._every_s:
            return None
        self._last, seen, self._since_last = now, self._since_last, 0
        return seen


class TopicLookup(Protocol):
    """What the router needs to know about topics."""

    def known_partitions(self, topic: str) -> Collection[int] | None:
        """Partitions of ``topic`` from metadata already at hand, or None (no wait)."""
        ...

    async def fetch_partitions(self, topic: str) -> Collection[int] | None:
        """Partitions of ``topic`` asked from the cluster now; None if it does not exist."""
        ...


@dataclass(frozen=True, slots=True)
class _Answer:
    partitions: Collection[int] | None
    expires: float


class _Memory(Generic[T]):
    """A bounded map: the least recently used key is dropped beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: OrderedDict[str, T] = OrderedDict()

    def get(self, key: str) -> T | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: T) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class ReplyRouter:
    """Checks reply routes against the allow pattern and the cluster's topics."""

    def __init__(
        self,
        default_topic: str,
        allowed: re.Pattern[str],
        lookup: TopicLookup,
        wait_s: float,
        answer_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_topics: int = DEFAULT_MAX_TOPICS,
    ) -> None:
        self._default_topic = default_topic
        self._allowed = allowed
        self._lookup = lookup
        self._wait_s = wait_s
        self._answer_ttl_s = answer_ttl_s
        self._clock = clock
        # Topics seen to exist lately: (expires, partitions); the per-reply fast path.
        self._known: _Memory[tuple[float, Collection[int]]] = _Memory(max_topics)
        # the cluster's answers, "missing" included
        self._answers: _Memory[_Answer] = _Memory(max_topics)
        self._asking: dict[str, asyncio.Future[Collection[int] | Unresolved | None]] = {}
        self._missing = _Occasional(_MISSING_LOG_EVERY_S, clock)

    @property
    def remembered_topics(self) -> int:
        """Topic names held in memory (both memories), for tests and metrics."""
        return len(self._known) + len(self._answers)

    async def resolve(self, route: ReplyRoute) -> Route:
        """The destination of a reply on ``route``, or why there is none."""
        topic = route.topic if route.topic is not None else self._default_topic
        if not self._allowed.fullmatch(topic):
            return Unroutable(ErrorCode.INVALID_REQUEST, f"reply topic {topic!r} is not allowed")
        partition = route.partition
        # Fast path: a topic (and partition) seen to exist lately.
        known = self._known.get(topic)
        if (
            known is not None
            and known[0] > self._clock()
            and (partition is None or partition in known[1])
        ):
            return Destination(topic, partition)
        partitions = self._lookup.known_partitions(topic)
        if partitions is None or (partition is not None and partition not in partitions):
            # Not in the producer's metadata: ask the cluster (answers, "missing" too,
            # are remembered for a while, so a burst of such requests asks once).
            fresh = await self._fresh_partitions(topic)
            if isinstance(fresh, Unresolved):
                return fresh
            partitions = fresh
        if partitions is not None:
            self._known.put(topic, (self._clock() + self._answer_ttl_s, partitions))
        if partitions is None:
            return Unroutable(ErrorCode.INVALID_REQUEST, f"reply topic {topic!r} does not exist")
        if partition is not None and partition not in partitions:
            return Unroutable(
                ErrorCode.INVALID_REQUEST,
                f"reply partition {partition} does not exist: "
                f"topic {topic!r} has {len(partitions)} partition(s)",
            )
        return Destination(topic, partition)

    async def _fresh_partitions(self, topic: str) -> Collection[int] | Unresolved | None:
        """Ask the cluster about ``topic``: once per topic at a time, answers remembered."""
        answer = self._answers.get(topic)
        if answer is not None and answer.expires > self._clock():
            return answer.partitions
        asking = self._asking.get(topic)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(topic))
            self._asking[topic] = asking
        # shield: one caller being cancelled must not cancel the others' lookup.
        return await asyncio.shield(asking)

    async def _ask(self, topic: str) -> Collection[int] | Unresolved | None:
        try:
            async with asyncio.timeout(self._wait_s):
                partitions = await self._lookup.fetch_partitions(topic)
        except Exception as exc:
            # No verdict (the broker is away or slow): not remembered, asked again later.
            reason = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
            log.warning("reply topic lookup failed", extra={"reply_topic": topic, "error": reason})
            return Unresolved(f"could not look up reply topic {topic!r}: {reason}")
        finally:
            self._asking.pop(topic, None)
        if partitions is None and (seen := self._missing.count()) is not None:
            log.warning(
                "reply topic does not exist (such requests go to the dead-letter topic)",
                extra={"reply_topic": topic, "missing_topics_since_last_line": seen},
            )
        self._answers.put(topic, _Answer(partitions, self._clock() + self._answer_ttl_s))
        return partitions


class ClientTopicLookup:
    """:class:`TopicLookup` over an aiokafka client (the reply producer's ``client``).

    Lookups share fetches of the cluster's metadata: each one waits for a fetch that
    starts after it asked (so its answer is fresh), and fetches start at most every
    ``min_interval_s``, so a burst of requests naming new topics costs one fetch a
    second, not one each.
    """

    def __init__(
        self,
        client: Any,
        min_interval_s: float = MIN_FETCH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last_fetch: float | None = None
        self._next_fetch: asyncio.Future[Any] | None = None

    def known_partitions(self, topic: str) -> Collection[int] | None:
        partitions: Collection[int] | None = self._client.cluster.partitions_for_topic(topic)
        return partitions

    async def fetch_partitions(self, topic: str) -> Collection[int] | None:
        # A metadata request for every topic, not for this one: asking for one topic
        # would add it to the producer's tracked topics for good (and could auto-create
        # it on brokers that allow that).
        cluster = await self._fresh_cluster()
        partitions: Collection[int] | None = cluster.partitions_for_topic(topic)
        if partitions is not None:
            # Track it, so the producer's own metadata (used by send) knows it too; a
            # topic it knew with fewer partitions (partitions were added) needs a refresh.
            await self._client.add_topic(topic)
            if self.known_partitions(topic) != partitions:
                await self._client.force_metadata_update()
        return partitions

    async def _fresh_cluster(self) -> Any:
        """The cluster's metadata from a fetch that starts after this call."""
        if self._next_fetch is None:
            self._next_fetch = asyncio.ensure_future(self._fetch_in_turn())
        # shield: one caller being cancelled must not cancel the others' fetch
        return await asyncio.shield(self._next_fetch)

    async def _fetch_in_turn(self) -> Any:
        if self._last_fetch is not None:
            wait = self._last_fetch + self._min_interval_s - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
        self._next_fetch = None  # who asks from now on waits for the fetch after this one
        self._last_fetch = self._clock()
        return await self._client.fetch_all_metadata()
