"""The worker's state of one partition assignment, and why fetching from it is paused.

Fetching from a partition stops for two kinds of reasons:

* the whole worker is full (the pair gate, :mod:`consumer.service.backpressure`): every
  assigned partition is paused;
* the partition itself is held: one of its records cannot be dead-lettered now, or too
  many of its records wait behind an unfinished one (commits can only move past a
  finished prefix, so what waits behind it is held in memory). Other partitions go on.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from enum import Enum

from consumer.service.attempts import Head
from consumer.service.offsets import PartitionOffsets


class Hold(Enum):
    """Why one partition's fetching is paused."""

    DEAD_LETTER_BLOCKED = "a record cannot be dead-lettered"
    UNCOMMITTED_BACKLOG = "too many records wait behind an unfinished one"


class PartitionWork:
    """The in-flight requests, offsets and holds of one assignment of one partition."""

    __slots__ = (
        "_holds",
        "careful_until",
        "counted",
        "head",
        "head_started",
        "offsets",
        "tasks",
    )

    def __init__(self, head: Head | None = None) -> None:
        self.offsets = PartitionOffsets()
        self.tasks: set[asyncio.Task[bool]] = set()
        self._holds: Counter[Hold] = Counter()
        # the committed position at assignment and its attempt count
        self.head = head
        self.head_started = False
        # while suspect: work carefully until the commit point reaches this offset
        self.careful_until: int | None = None
        # the last (offset, attempts) this worker committed as an attempt, before the
        # record there ran (consumer.service.attempts)
        self.counted: tuple[int, int] | None = None

    def take_head(self, offset: int) -> Head | None:
        """The head when ``offset`` is the first record fetched in this assignment and
        sits at the committed position (or the partition has no committed position yet);
        else None."""
        if self.head_started:
            return None
        self.head_started = True
        if self.head is None:
            self.head = Head(offset, 0)
        return self.head if offset == self.head.offset else None

    @property
    def suspect(self) -> bool:
        """The last owner started the record at the committed position and did not get
        past it (it died, or was revoked mid-record): work carefully for a while."""
        return self.head is not None and self.head.attempts > 0

    @property
    def unfinished_attempt(self) -> tuple[int, int] | None:
        """The attempt this worker counted and has not finished: (offset, attempts)."""
        if self.counted is None:
            return None
        committable = self.offsets.committable
        return self.counted if committable is None or committable <= self.counted[0] else None

    @property
    def careful_done(self) -> bool:
        """The commit point has passed every record the last owner may have had in flight."""
        committable = self.offsets.committable
        return self.careful_until is None or (
            committable is not None and committable >= self.careful_until
        )

    @property
    def held(self) -> bool:
        """True while this partition must not be fetched from."""
        return bool(self._holds)

    @property
    def holds(self) -> list[Hold]:
        """The reasons it is held."""
        return list(self._holds)

    def hold(self, reason: Hold) -> None:
        """Add one hold for ``reason`` (holds of the same reason are counted)."""
        self._holds[reason] += 1

    def release(self, reason: Hold) -> None:
        """Drop one hold for ``reason``."""
        self._holds[reason] -= 1
        if self._holds[reason] <= 0:
            del self._holds[reason]

    def limit_backlog(self, max_records: int, waiting: int = 0) -> None:
        """Hold the partition while more than ``max_records`` are not yet committable, or
        answered and ``waiting`` in memory for their commit (exactly-once's outbox)."""
        over = self.offsets.backlog + waiting > max_records
        if over and Hold.UNCOMMITTED_BACKLOG not in self._holds:
            self.hold(Hold.UNCOMMITTED_BACKLOG)
        elif not over and Hold.UNCOMMITTED_BACKLOG in self._holds:
            self.release(Hold.UNCOMMITTED_BACKLOG)
