"""The SDK's retry loop and policy, driven through a fake of our own ``Attempts``
interface on a virtual clock: what is retried, the pauses, the time budget, and that a
reply to any attempt ends the call; no broker needed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from producer_sdk import (
    NO_RETRY,
    ClientClosed,
    DeliveryError,
    InvalidArgument,
    MalformedReply,
    RerankClient,
    RerankError,
    RerankErrorReply,
    RerankTimeout,
    RetryPolicy,
)
from producer_sdk.result import RerankResult, Timing, Usage
from producer_sdk.retry import DEFAULT_RETRY, call_with_retries

RESULT = RerankResult("cid", "m", [], Usage(1), Timing(0.0, 0.0, 0.0))
INTERNAL = RerankErrorReply("internal", "the engine is shutting down", True, "cid")
INVALID = RerankErrorReply("invalid_request", "query: field required", False, "cid")


@dataclass
class Reply:
    """What answers one attempt ``after`` seconds from its send: a result or an error."""

    after: float
    outcome: RerankResult | RerankError = RESULT


@dataclass
class FakeAttempts:
    """The client's side of a call on a virtual clock. ``replies[n]`` answer attempt
    ``n + 1`` (none: that attempt is never answered). As in the client, once an outcome
    has failed, replies are dropped until ``reopen``; a result ends the call."""

    replies: dict[int, list[Reply]] = field(default_factory=dict)
    now: float = 0.0
    sends: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    reopened: int = 0
    _failed: RerankError | None = None
    _events: list[tuple[float, int, RerankResult | RerankError]] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def send(self, attempt: int) -> None:
        assert attempt == len(self.sends) + 1
        self.sends.append(self.now)
        for reply in self.replies.get(attempt, []):
            self._events.append((self.now + reply.after, attempt, reply.outcome))
        self._events.sort(key=lambda event: event[0])

    async def wait(self, seconds: float) -> RerankResult | None:
        await asyncio.sleep(0)
        self.waits.append(seconds)
        if self._failed is not None:
            raise self._failed
        until = self.now + seconds
        while self._events and self._events[0][0] <= until:
            at, _, outcome = self._events.pop(0)
            self.now = max(self.now, at)
            if isinstance(outcome, RerankError):
                self._failed = outcome
                raise outcome
            return outcome
        self.now = until
        return None

    def reopen(self) -> None:
        assert self._failed is not None, "reopen without a failed outcome"
        self._failed = None
        self.reopened += 1
        self._events = [e for e in self._events if e[0] > self.now]  # dropped meanwhile


async def run(
    attempts: FakeAttempts, policy: RetryPolicy = DEFAULT_RETRY, timeout: float = 30.0
) -> RerankResult:
    return await call_with_retries(
        attempts, policy, timeout, clock=attempts.clock, uniform=lambda: 1.0
    )


# -- what is retried ---------------------------------------------------------------------


async def test_a_retriable_error_reply_is_sent_again_and_the_retry_answers() -> None:
    fake = FakeAttempts({1: [Reply(0.5, INTERNAL)], 2: [Reply(0.25)]})

    assert await run(fake) is RESULT

    assert fake.sends == pytest.approx([0.0, 0.6])  # the error at 0.5, then the first pause: 0.1 s
    assert fake.reopened == 1


@pytest.mark.parametrize(
    "error",
    [
        INVALID,
        RerankErrorReply("deadline_exceeded", "too late", False, "cid"),
        MalformedReply("not the contract"),
        ClientClosed("closed"),
        InvalidArgument("the request is too large (2000000 bytes)"),
        DeliveryError("sending failed: UnknownTopicOrPartition", retriable=False),
    ],
)
async def test_a_failure_that_is_not_retriable_reaches_the_caller_at_once(
    error: RerankError,
) -> None:
    fake = FakeAttempts({1: [Reply(0.5, error)]})

    with pytest.raises(type(error)) as raised:
        await run(fake)

    assert raised.value is error
    assert len(fake.sends) == 1 and fake.now == 0.5


async def test_a_retriable_delivery_error_is_sent_again() -> None:
    failed_send = DeliveryError("sending failed: KafkaTimeoutError", retriable=True)
    fake = FakeAttempts({1: [Reply(0.0, failed_send)], 2: [Reply(0.3)]})

    assert await run(fake) is RESULT
    assert len(fake.sends) == 2


async def test_the_last_error_is_raised_when_attempts_run_out() -> None:
    last = RerankErrorReply("internal", "still shutting down", True, "cid")
    fake = FakeAttempts(
        {1: [Reply(0.1, INTERNAL)], 2: [Reply(0.1, INTERNAL)], 3: [Reply(0.1, last)]}
    )

    with pytest.raises(RerankErrorReply) as raised:
        await run(fake)

    assert raised.value is last
    assert len(fake.sends) == DEFAULT_RETRY.attempts == 3


async def test_no_retry_sends_once() -> None:
    fake = FakeAttempts({1: [Reply(0.1, INTERNAL)], 2: [Reply(0.1)]})

    with pytest.raises(RerankErrorReply):
        await run(fake, NO_RETRY)

    assert len(fake.sends) == 1


# -- time ----------------------------------------------------------------------------------


async def test_by_default_an_unanswered_request_times_out_at_the_timeout_unsent_again() -> None:
    """The default budget is the timeout: a retry would make the call longer, so none."""
    fake = FakeAttempts({})

    with pytest.raises(RerankTimeout, match=r"^no reply within 5 s$"):
        await run(fake, timeout=5.0)

    assert fake.sends == [0.0] and fake.now == 5.0


async def test_a_budget_above_the_timeout_sends_an_unanswered_request_again() -> None:
    fake = FakeAttempts({2: [Reply(0.5)]})  # the first attempt is never answered

    result = await run(fake, RetryPolicy(budget=30.0), timeout=5.0)

    assert result is RESULT
    assert fake.sends == pytest.approx([0.0, 5.1])  # its timeout, then the pause
    assert fake.now == pytest.approx(5.6)


async def test_a_late_reply_to_the_first_attempt_still_answers_the_call() -> None:
    """Attempts share one outcome: whichever reply comes first resolves the call."""
    fake = FakeAttempts({1: [Reply(7.0)]})  # after its 5 s timeout; attempt 2 never answered

    assert await run(fake, RetryPolicy(budget=30.0), timeout=5.0) is RESULT
    assert len(fake.sends) == 2 and fake.now == 7.0


async def test_a_reply_during_the_pause_ends_the_call_without_another_send() -> None:
    """An error reply, then (a redelivery) a success for the same request 50 ms later."""
    fake = FakeAttempts({1: [Reply(1.0, INTERNAL), Reply(1.05)]})

    assert await run(fake) is RESULT
    assert len(fake.sends) == 1 and fake.now == 1.05


async def test_every_attempt_and_pause_fits_in_the_budget() -> None:
    fake = FakeAttempts({})

    with pytest.raises(RerankTimeout, match=r"\(3 attempts\)"):
        await run(fake, RetryPolicy(attempts=10, budget=12.0), timeout=5.0)

    assert fake.sends == pytest.approx(
        [0.0, 5.1, 10.3]
    )  # pauses 0.1 and 0.2; the third waits 1.7 s
    assert fake.now == 12.0


async def test_a_retry_that_would_end_past_the_budget_is_not_made() -> None:
    """The error came with less time left than the pause: the caller gets that error,
    not a timeout that only says less."""
    fake = FakeAttempts({1: [Reply(29.95, INTERNAL)], 2: [Reply(0.01)]})

    with pytest.raises(RerankErrorReply) as raised:
        await run(fake, timeout=30.0)

    assert raised.value is INTERNAL and len(fake.sends) == 1


async def test_a_smaller_budget_than_the_timeout_caps_the_call() -> None:
    fake = FakeAttempts({})

    with pytest.raises(RerankTimeout, match=r"^no reply within 2 s$"):
        await run(fake, RetryPolicy(budget=2.0), timeout=30.0)

    assert fake.now == 2.0


# -- the policy -------------------------------------------------------------------------------


def test_pauses_double_up_to_the_cap_with_full_jitter() -> None:
    policy = RetryPolicy(backoff=0.1, max_backoff=1.0)

    caps = [policy.pause(retry, lambda: 1.0) for retry in range(1, 7)]

    assert caps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.pause(3, lambda: 0.5) == pytest.approx(0.2)
    assert policy.pause(3, lambda: 0.0) == 0.0
    assert all(0.0 <= policy.pause(4) < 0.8 for _ in range(100))  # random.random by default


@pytest.mark.parametrize(
    "options",
    [
        {"attempts": 0},
        {"attempts": 1.5},
        {"attempts": True},
        {"backoff": -0.1},
        {"backoff": float("nan")},
        {"max_backoff": "1"},
        {"budget": 0},
        {"budget": float("inf")},
    ],
)
def test_a_bad_policy_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        RetryPolicy(**options)


def test_the_default_policy() -> None:
    assert RetryPolicy(attempts=3, backoff=0.1, max_backoff=2.0, budget=None) == DEFAULT_RETRY
    assert NO_RETRY.attempts == 1


async def test_the_client_checks_its_retry_arguments_before_anything_else() -> None:
    with pytest.raises(InvalidArgument, match="retry must be a RetryPolicy"):
        RerankClient(bootstrap_servers="127.0.0.1:1", retry=3)  # type: ignore[arg-type]
    client = RerankClient(bootstrap_servers="127.0.0.1:1", retry=NO_RETRY)  # never started
    with pytest.raises(InvalidArgument, match="retry must be a RetryPolicy"):
        await client.rerank("q", ["d"], retry={"attempts": 2})  # type: ignore[arg-type]
