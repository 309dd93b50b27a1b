"""Which offset of a partition is safe to commit.

Records are registered in the order they were fetched and finish in any order
(a short request overtakes a long one). Kafka's committed offset means "everything
below this is done", so the committable offset is one past the longest run of
finished records from the front: a commit never skips a record still in flight.

One :class:`PartitionOffsets` belongs to one assignment of one partition. After a
rebalance the worker makes a fresh one, so work that finishes late for an old
assignment cannot move the new assignment's offsets.
"""

from __future__ import annotations

from collections import deque


class PartitionOffsets:
    """Offsets of one partition assignment: registered in fetch order, done in any order."""

    __slots__ = ("_committable", "_committed", "_last_registered", "_order", "_unfinished")

    def __init__(self) -> None:
        self._order: deque[int] = deque()  # registered offsets not yet below the commit point
        self._unfinished: set[int] = set()  # registered offsets not yet done
        self._last_registered: int | None = None
        self._committable: int | None = None
        self._committed: int | None = None

    def register(self, offset: int) -> None:
        """Record that ``offset`` was fetched; offsets must arrive in increasing order."""
        if self._last_registered is not None and offset <= self._last_registered:
            raise ValueError(
                f"offset {offset} registered after {self._last_registered}: "
                "offsets must be registered in fetch order"
            )
        self._last_registered = offset
        self._order.append(offset)
        self._unfinished.add(offset)

    def done(self, offset: int) -> None:
        """Record that ``offset`` is finished (its reply or DLQ record is acknowledged)."""
        try:
            self._unfinished.remove(offset)
        except KeyError:
            raise ValueError(f"offset {offset} is not in flight") from None
        order, unfinished = self._order, self._unfinished
        # Move the commit point over every finished record at the front; gaps between
        # registered offsets (compaction, transaction markers) are not records we own.
        while order and order[0] not in unfinished:
            self._committable = order.popleft() + 1

    @property
    def committable(self) -> int | None:
        """Offset to commit (one past the last of the finished prefix), or None."""
        return self._committable

    @property
    def uncommitted(self) -> int | None:
        """The committable offset if it is ahead of the last one marked committed."""
        if self._committable is None:
            return None
        if self._committed is not None and self._committable <= self._committed:
            return None
        return self._committable

    def mark_committed(self, offset: int) -> None:
        """Remember that ``offset`` was committed, so the same commit is not sent again."""
        if self._committed is None or offset > self._committed:
            self._committed = offset

    @property
    def backlog(self) -> int:
        """Records registered and not yet below the commit point (finished or not)."""
        return len(self._order)

    @property
    def in_flight(self) -> int:
        """Records registered and not yet done."""
        return len(self._unfinished)

    @property
    def idle(self) -> bool:
        """True when every registered record is done."""
        return not self._unfinished
