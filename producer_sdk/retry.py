"""Retrying a rerank call: which failures, how often, how long to pause, within what time.

A retry sends the *same* request again: the same body and the same correlation id. So
whichever attempt's reply comes first resolves the call, and a reply to another attempt
that comes later is dropped as a duplicate, exactly like a reply repeated by the
at-least-once service. A call never produces two results, whatever the timing.

What is retried (``RerankError.retriable``): error replies the service marks retriable
(``internal`` while a worker shuts down, a failed batch), sends that Kafka failed with a
retriable error, and, only when the policy's ``budget`` leaves time for it, an attempt
that got no reply within the call's ``timeout``. Never retried: bad arguments, error
replies that are not retriable (``invalid_request``, ``payload_too_large``,
``deadline_exceeded``), malformed replies, a closed client.

Time: every attempt and pause fits in the call's budget, ``RetryPolicy.budget`` seconds
(default: the call's ``timeout``). With the default, the first attempt may wait the whole
timeout, so an unanswered request is not sent again (a request nobody answered yet waits
in its partition; sending it again would only add work when the workers are behind),
and a call never takes longer than its timeout. A budget larger than the timeout asks for
more: each attempt then waits ``timeout`` for its reply before the next is sent, and the
call ends at the budget. The service is told the call's end (``deadline-ms``) on every
attempt, so it never works on a request nobody waits for.

Pauses: exponential backoff with full jitter. Before retry ``n`` (1, 2, ...) the call
pauses a random time in ``[0, min(max_backoff, backoff * 2 ** (n - 1))]``; a reply to an
earlier attempt during the pause still ends the call.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from producer_sdk.errors import InvalidArgument, RerankError, RerankTimeout
from producer_sdk.result import RerankResult


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a call is retried; the client's default is ``RetryPolicy()``.

    ``attempts``: the most times one request is sent, the first included (1: never
    retry). ``backoff``: the longest pause before the first retry, in seconds; it doubles
    for each further retry, up to ``max_backoff``; the pause is a random part of it.
    ``budget``: seconds the call may take over all its attempts and pauses; None (the
    default) is the call's ``timeout``, so retries never make a call longer than its
    timeout. With a budget above the timeout, an attempt with no reply within the
    timeout is sent again.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 2.0
    budget: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise InvalidArgument(f"attempts must be an int, not {type(self.attempts).__name__}")
        if self.attempts < 1:
            raise InvalidArgument(f"attempts must be at least 1, not {self.attempts}")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} must be a number of seconds >= 0, not {value!r}")
        if self.budget is not None and (
            not _is_number(self.budget) or not math.isfinite(self.budget) or self.budget <= 0
        ):
            raise InvalidArgument(
                f"budget must be a positive number of seconds, not {self.budget!r}"
            )

    def pause(self, retry: int, uniform: Callable[[], float] = random.random) -> float:
        """Seconds to pause before retry number ``retry`` (1 for the second attempt):
        full jitter, ``uniform()`` (in [0, 1)) times the capped exponential backoff."""
        cap = min(self.max_backoff, self.backoff * 2.0 ** (retry - 1))
        return cap * uniform()


DEFAULT_RETRY = RetryPolicy()
"""The client's default: up to 3 attempts within the call's timeout."""

NO_RETRY = RetryPolicy(attempts=1)
"""Send each request once: every failure reaches the caller as it happened."""


def check_retry(policy: object) -> RetryPolicy:
    """``policy`` if it is a :class:`RetryPolicy`, else :class:`InvalidArgument`."""
    if not isinstance(policy, RetryPolicy):
        raise InvalidArgument(f"retry must be a RetryPolicy, not {type(policy).__name__}")
    return policy


class Attempts(Protocol):
    """The sends of one call and the outcome they share; the client implements it."""

    def send(self, attempt: int) -> None:
        """Hand the request to Kafka (``attempt`` 1 is the first send); returns at once."""
        ...

    async def wait(self, seconds: float) -> RerankResult | None:
        """The call's result once a reply to any attempt comes, or None when nothing
        came within ``seconds``. Raises the :class:`RerankError` an attempt ended with
        (an error reply, a failed send); after that, only :meth:`reopen` makes the call
        wait for another outcome."""
        ...

    def reopen(self) -> None:
        """After :meth:`wait` raised: take the next reply to any attempt as the outcome."""
        ...


async def call_with_retries(
    attempts: Attempts,
    policy: RetryPolicy,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    uniform: Callable[[], float] = random.random,
) -> RerankResult:
    """Run one call under ``policy``: send, wait up to ``timeout`` for a reply, and send
    again after a pause while the failure is retriable and attempts and budget are left.

    Raises the last attempt's error: the error reply or delivery error as it came, or
    :class:`RerankTimeout` when the last attempt got no reply in time.
    """
    budget = timeout if policy.budget is None else policy.budget
    started = clock()
    ends = started + budget
    attempt = 1
    attempts.send(attempt)
    attempt_ends = min(ends, clock() + timeout)
    while True:
        failure: RerankError
        try:
            result = await attempts.wait(max(0.0, attempt_ends - clock()))
        except RerankError as error:
            if not error.retriable:
                raise
            failure = error
        else:
            if result is not None:
                return result
            failure = _timeout(attempt, min(timeout, budget), clock() - started)
        if attempt >= policy.attempts:
            raise failure
        pause = policy.pause(attempt, uniform)
        if clock() + pause >= ends:
            raise failure  # no time left for another attempt
        if not isinstance(failure, RerankTimeout):
            attempts.reopen()
        try:
            result = await attempts.wait(pause)  # a reply to an earlier attempt still counts
        except RerankError as error:
            if not error.retriable:
                raise
            attempts.reopen()
            result = None
        if result is not None:
            return result
        attempt += 1
        attempts.send(attempt)
        attempt_ends = min(ends, clock() + timeout)


def _timeout(attempt: int, wait: float, elapsed: float) -> RerankTimeout:
    if attempt == 1:
        return RerankTimeout(f"no reply within {wait:g} s")
    return RerankTimeout(f"no reply within {elapsed:.3g} s ({attempt} attempts)")
