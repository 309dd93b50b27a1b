"""The attempt count kept in commit metadata, and a partition's head record."""

from __future__ import annotations

import pytest

from consumer.service.attempts import Head, decode_attempts, encode_attempts
from consumer.service.partitions import PartitionWork


@pytest.mark.parametrize("attempts", [0, 1, 7])
def test_attempts_round_trip_through_commit_metadata(attempts: int) -> None:
    assert decode_attempts(encode_attempts(attempts)) == attempts


@pytest.mark.parametrize(
    "metadata", [None, "", "not json", "[1]", '{"attempts": -1}', '{"attempts": "2"}', '{"x": 1}']
)
def test_metadata_that_is_not_ours_counts_as_no_attempt(metadata: str | None) -> None:
    assert decode_attempts(metadata) == 0


def test_the_head_is_the_first_record_fetched_at_the_committed_position() -> None:
    work = PartitionWork(Head(offset=5, attempts=2))
    assert work.suspect
    assert work.take_head(5) == Head(5, 2)
    assert work.take_head(5) is None  # only once per assignment


def test_a_partition_without_a_committed_position_counts_its_first_record() -> None:
    work = PartitionWork()
    assert not work.suspect
    assert work.take_head(12) == Head(12, 0)
    assert work.take_head(13) is None


def test_careful_work_ends_once_the_commit_point_passes_the_window() -> None:
    work = PartitionWork(Head(offset=0, attempts=1))
    work.careful_until = 2
    for offset in (0, 1):
        work.offsets.register(offset)
    work.offsets.done(0)
    assert not work.careful_done
    work.offsets.done(1)
    assert work.careful_done
