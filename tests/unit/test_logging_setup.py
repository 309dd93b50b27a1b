"""Log output: text and JSON lines, with the ``extra=`` fields of each record."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from consumer.logging_setup import configure_logging

RECORD_CONTEXT = {"topic": "rerank.requests", "partition": 3, "offset": 42, "correlation_id": "c1"}


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_message_level_and_extras() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)

    logging.getLogger("consumer.test").info("answered %d pairs", 5, extra=RECORD_CONTEXT)

    (line,) = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "answered 5 pairs"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "consumer.test"
    assert {key: entry[key] for key in RECORD_CONTEXT} == RECORD_CONTEXT
    assert "time" in entry


def test_json_exception_stays_on_one_line() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)

    try:
        raise ValueError("bad batch")
    except ValueError:
        logging.getLogger("consumer.test").exception("batch failed")

    (line,) = out.getvalue().splitlines()
    entry = json.loads(line)
    assert "ValueError: bad batch" in entry["exception"]


def test_json_renders_values_it_cannot_encode() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)

    logging.getLogger("consumer.test").info("assigned", extra={"partitions": {("t", 0)}})

    assert "('t', 0)" in json.loads(out.getvalue())["partitions"]


def test_text_lines_append_extras() -> None:
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)

    logging.getLogger("consumer.test").warning("slow", extra=RECORD_CONTEXT)

    (line,) = out.getvalue().splitlines()
    assert " WARNING consumer.test: slow " in line
    assert line.endswith("topic=rerank.requests partition=3 offset=42 correlation_id=c1")


def test_level_filters_and_reconfiguring_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "text", stream=first)
    configure_logging("warning", "text", stream=second)

    logging.getLogger("consumer.test").info("hidden")
    logging.getLogger("consumer.test").error("shown")

    assert first.getvalue() == ""
    assert "shown" in second.getvalue()
    assert "hidden" not in second.getvalue()


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError):
        configure_logging("INFO", "xml")
