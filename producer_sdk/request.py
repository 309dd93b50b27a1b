"""Checking a call's arguments and building the request body (wire contract v1).

Everything here runs before anything is sent, so a bad argument costs no round trip
and never reaches the service.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from producer_sdk.errors import InvalidArgument


def build_request_body(
    query: str,
    documents: Sequence[str],
    *,
    instruction: str | None = None,
    top_n: int | None = None,
    return_documents: bool = False,
    raw_scores: bool = False,
    truncate: bool = True,
    split_long_documents: bool | None = None,
) -> dict[str, Any]:
    """The request record's value, or :class:`InvalidArgument` naming what is wrong.

    ``truncate`` is sent only when false, and ``split_long_documents`` only when given: a
    worker older than the option answers a request that has it ``invalid_request``
    (unknown field) rather than ignoring it silently.
    """
    if not isinstance(query, str):
        raise InvalidArgument(f"query must be a str, not {type(query).__name__}")
    if not query.strip():
        raise InvalidArgument("query is empty")
    _check_documents(documents)
    if instruction is not None and not isinstance(instruction, str):
        raise InvalidArgument(f"instruction must be a str, not {type(instruction).__name__}")
    if top_n is not None:
        if isinstance(top_n, bool) or not isinstance(top_n, int):
            raise InvalidArgument(f"top_n must be an int, not {type(top_n).__name__}")
        if top_n < 1:
            raise InvalidArgument(f"top_n must be at least 1, not {top_n}")
    for name, flag in (
        ("return_documents", return_documents),
        ("raw_scores", raw_scores),
        ("truncate", truncate),
    ):
        if not isinstance(flag, bool):
            raise InvalidArgument(f"{name} must be a bool, not {type(flag).__name__}")
    if split_long_documents is not None and not isinstance(split_long_documents, bool):
        raise InvalidArgument(
            f"split_long_documents must be a bool, not {type(split_long_documents).__name__}"
        )

    body: dict[str, Any] = {"query": query, "documents": list(documents)}
    if instruction is not None:
        body["instruction"] = instruction
    if top_n is not None:
        body["top_n"] = top_n
    if return_documents:
        body["return_documents"] = True
    if raw_scores:
        body["raw_scores"] = True
    if not truncate:
        body["truncate"] = False
    if split_long_documents is not None:
        body["split_long_documents"] = split_long_documents
    return body


def check_timeout(timeout: float) -> float:
    """``timeout`` as a float of seconds if it is a positive finite number."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidArgument(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout}")
    return float(timeout)


def _check_documents(documents: Sequence[str]) -> None:
    # A str is a Sequence too: rerank("q", "doc") would score each character.
    if isinstance(documents, str | bytes) or not isinstance(documents, Sequence):
        raise InvalidArgument(f"documents must be a list of str, not {type(documents).__name__}")
    if not documents:
        raise InvalidArgument("documents is empty")
    for position, document in enumerate(documents):
        if not isinstance(document, str):
            raise InvalidArgument(
                f"documents[{position}] must be a str, not {type(document).__name__}"
            )
