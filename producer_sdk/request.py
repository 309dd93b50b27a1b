"""Checking a call's arguments and building the request body (wire contract v1).

Everything here runs before anything is sent, so a bad argument costs no round trip
and never reaches the service.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any, Final, TypedDict, Union, Unpack, get_args, get_origin, get_type_hints

from producer_sdk.errors import InvalidArgument
from schemas.models import RerankRequest


class RerankOptions(TypedDict, total=False):
    """What a request may ask beyond its query and documents (wire contract v1; each
    field's meaning and default is :class:`schemas.models.RerankRequest`'s).

    A new request field is one line here: its type is checked from its annotation, and
    it is sent only when it differs from the contract's default.
    """

    instruction: str | None
    top_n: int | None
    return_documents: bool
    raw_scores: bool
    truncate: bool
    split_long_documents: bool | None


_OPTION_TYPES = get_type_hints(RerankOptions)
_WIRE_DEFAULTS = {name: RerankRequest.model_fields[name].default for name in _OPTION_TYPES}
OPTION_NAMES: Final = tuple(_OPTION_TYPES)


def check_options(options: RerankOptions) -> None:
    """:class:`InvalidArgument` naming the first option that is unknown or of the wrong
    type or value (what :func:`build_request_body` checks of them)."""
    for name, value in options.items():
        _check_option(name, value)


def build_request_body(
    query: str, documents: Sequence[str], **options: Unpack[RerankOptions]
) -> dict[str, Any]:
    """The request record's value, or :class:`InvalidArgument` naming what is wrong.

    An option is sent only when it differs from the contract's default: a worker older
    than an option (``truncate``, say) answers a request that has it ``invalid_request``
    (unknown field) rather than ignoring it silently.
    """
    if not isinstance(query, str):
        raise InvalidArgument(f"query must be a str, not {type(query).__name__}")
    if not query.strip():
        raise InvalidArgument("query is empty")
    _check_documents(documents)
    body: dict[str, Any] = {"query": query, "documents": list(documents)}
    check_options(options)
    for name, value in options.items():
        if value != _WIRE_DEFAULTS[name]:
            body[name] = value
    return body


def _check_option(name: str, value: Any) -> None:
    expected = _OPTION_TYPES.get(name)
    if expected is None:
        raise InvalidArgument(f"unknown option {name!r} (known: {', '.join(_OPTION_TYPES)})")
    allowed = (
        get_args(expected) if get_origin(expected) in (Union, types.UnionType) else (expected,)
    )
    if value is None and type(None) in allowed:
        return
    kind = next(t for t in allowed if t is not type(None))
    # a bool is an int to isinstance, and an int is never a bool here
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise InvalidArgument(
            f"{name} must be {article} {kind.__name__}, not {type(value).__name__}"
        )
    if name == "top_n" and value < 1:
        raise InvalidArgument(f"top_n must be at least 1, not {value}")


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
