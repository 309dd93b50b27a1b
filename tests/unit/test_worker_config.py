"""WorkerConfig refuses settings that cannot work and derives the reply allow pattern."""

from __future__ import annotations

import pytest

from consumer.service.worker_config import WorkerConfig


def test_default_pattern_allows_the_reply_topic_and_its_children_only() -> None:
    pattern = WorkerConfig(bootstrap_servers="k:9092").allowed_reply_pattern
    for topic in ("rerank.replies", "rerank.replies.team-a", "rerank.replies.a.b"):
        assert pattern.fullmatch(topic), topic
    for topic in ("rerank.repliesX", "rerank.replies.", "payments", "xrerank.replies"):
        assert not pattern.fullmatch(topic), topic


def test_default_pattern_follows_a_custom_reply_topic() -> None:
    pattern = WorkerConfig(bootstrap_servers="k:9092", reply_topic="a.b").allowed_reply_pattern
    assert pattern.fullmatch("a.b") and pattern.fullmatch("a.b.c")
    assert not pattern.fullmatch("aXb"), "the dot is literal"


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"bootstrap_servers": " "}, "bootstrap_servers"),
        ({"inflight_high_pairs": 0}, "inflight_high_pairs"),
        ({"inflight_low_pairs": 4096}, "inflight_low_pairs"),
        ({"drain_timeout_s": 0}, "drain_timeout_s"),
        ({"default_max_age_s": -1}, "default_max_age_s"),
        ({"allowed_reply_topics": "("}, "not a valid regular expression"),
        ({"allowed_reply_topics": "other"}, "does not allow the default reply topic"),
    ],
)
def test_unworkable_settings_are_refused(overrides: dict[str, object], problem: str) -> None:
    kwargs: dict[str, object] = {"bootstrap_servers": "k:9092", **overrides}
    with pytest.raises(ValueError, match=problem):
        WorkerConfig(**kwargs)  # type: ignore[arg-type]
