"""The lookahead lets records in oldest first across partitions, each partition's in
offset order, and gives back what it holds when the position is moved."""

from __future__ import annotations

from typing import Any

from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.service.oldest_first import Lookahead

P0, P1, P2 = (TopicPartition("rerank.requests", p) for p in range(3))


def record(tp: TopicPartition, offset: int, timestamp: int) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(tp.topic, tp.partition, offset, timestamp, 0, None, b"{}", None, 0, 2, [])


def taken_order(taken: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> list[int]:
    return sorted(r.timestamp for records in taken.values() for r in records)


def test_records_come_oldest_first_across_partitions() -> None:
    lookahead = Lookahead()
    # partition 0 was fetched first and holds the newest records
    lookahead.add({P0: [record(P0, o, 100 + o) for o in range(5)]})
    lookahead.add({P1: [record(P1, o, 10 * o) for o in range(5)]})
    taken = lookahead.take(6, {P0, P1})
    assert [r.offset for r in taken[P1]] == [0, 1, 2, 3, 4]
    assert [r.offset for r in taken[P0]] == [0]
    assert taken_order(taken) == [0, 10, 20, 30, 40, 100]
    rest = lookahead.take(10, {P0, P1})
    assert [r.offset for r in rest[P0]] == [1, 2, 3, 4] and P1 not in rest
    assert not lookahead.holding()


def test_a_closed_partition_keeps_its_records_for_later() -> None:
    lookahead = Lookahead()
    lookahead.add({P0: [record(P0, 0, 1)], P1: [record(P1, 7, 5), record(P1, 8, 6)]})
    assert lookahead.take(5, {P1}) == {P1: [record(P1, 7, 5), record(P1, 8, 6)]}
    lookahead.add({P0: [record(P0, 1, 9)]})  # after what partition 0 has queued
    assert [r.offset for r in lookahead.take(5, {P0, P1})[P0]] == [0, 1]


class SeekRecorder:
    def __init__(self, fetched: dict[TopicPartition, list[Any]] | None = None) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.fetched = fetched or {}
        self.asked: list[TopicPartition] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def getmany(self, tp: TopicPartition) -> dict[TopicPartition, list[Any]]:
        self.asked.append(tp)
        return {tp: self.fetched.pop(tp)} if tp in self.fetched else {}


def test_rewinding_goes_back_over_the_queue() -> None:
    lookahead = Lookahead()
    lookahead.add({P0: [record(P0, 4, 1), record(P0, 5, 2)], P1: [record(P1, 9, 3)]})
    consumer = SeekRecorder()
    lookahead.rewind(consumer, P0, 7)  # records 4 and 5 were taken from the consumer too
    lookahead.rewind(consumer, P1, 2)
    lookahead.rewind(consumer, P2, 3)  # nothing queued: just the seek
    assert consumer.seeks == [(P0, 4), (P1, 2), (P2, 3)]
    assert not lookahead.holding()


async def test_refill_asks_only_partitions_with_nothing_queued() -> None:
    lookahead = Lookahead()
    lookahead.add({P0: [record(P0, 0, 50)]})
    consumer = SeekRecorder({P1: [record(P1, 0, 20)], P0: [record(P0, 1, 60)]})
    await lookahead.refill(consumer, [P0, P1, P2])
    assert consumer.asked == [P1, P2]
    assert lookahead.take(1, {P0, P1}) == {P1: [record(P1, 0, 20)]}


def test_dropped_partitions_are_forgotten() -> None:
    lookahead = Lookahead()
    lookahead.add({P0: [record(P0, 0, 1)], P1: [record(P1, 0, 2)]})
    lookahead.drop([P0])
    assert lookahead.take(5, {P0, P1}) == {P1: [record(P1, 0, 2)]}
