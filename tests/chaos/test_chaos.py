"""The chaos suite: faults injected while a steady stream of SDK requests flows through
several workers and a real broker. In every scenario no request is lost: each one has a
reply or a dead-letter record once the fault is over. In exactly-once mode a
``read_committed`` reader also sees no reply twice.

Each scenario runs for ``RERANK_CHAOS_SECONDS`` of traffic (default 8: the short
version in ``scripts/test.sh``; the long version in docs/reliability.md used 120).
``RERANK_CHAOS_REPORT=FILE`` appends one JSON line a run (the table's source);
``RERANK_CHAOS_SET=commit_interval_s=1.0`` gives every worker that setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from chaos_tools import (
    ChaosBroker,
    ChaosTopics,
    Ledger,
    Traffic,
    WorkerPool,
    make_topics,
    pool_running,
    produce_raw,
    wait_for_answers,
)
from chaos_worker import KILL_QUERY

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(900)]

SECONDS = float(os.environ.get("RERANK_CHAOS_SECONDS", "8"))
RATE = float(os.environ.get("RERANK_CHAOS_RATE", "25"))  # requests a second
REPORT = os.environ.get("RERANK_CHAOS_REPORT")
MODES = ("at_least_once", "exactly_once")
SESSION_TIMEOUT_S = 10.0  # the default: faults meant to outlast it last longer
SETTLE_S = 120.0  # after the fault: longest wait for the last answers
# Settings every worker gets, from RERANK_CHAOS_SET="name=value,name=value" (to compare a
# setting's effect, e.g. commit_interval_s=1.0); none by default.
WORKER_SETTINGS = dict(
    item.split("=", 1) for item in os.environ.get("RERANK_CHAOS_SET", "").split(",") if item
)


@dataclass
class Run:
    """One scenario run: what the fault injector can reach."""

    broker: ChaosBroker
    pools: list[WorkerPool]  # one per delivery mode, run side by side
    # moments of the fault (time.monotonic()) that the report times recovery from
    timeline: dict[str, float] = field(default_factory=dict)

    def mark(self, moment: str) -> None:
        self.timeline[moment] = time.monotonic()

    @property
    def topics(self) -> list[ChaosTopics]:
        return [pool.topics for pool in self.pools]

    def signal(self, index: int, signum: int) -> None:
        """Send ``signum`` to worker ``index`` of every pool."""
        for pool in self.pools:
            pool.signal(pool.slots[index], signum)

    async def wait_ready(self, index: int) -> None:
        await asyncio.gather(*(pool.wait_ready(pool.slots[index]) for pool in self.pools))


Inject = Callable[[Run], Awaitable[str]]  # injects the fault; returns what it did


async def run_scenario(
    broker: ChaosBroker,
    logs: Path,
    name: str,
    inject: Inject,
    workers: int = 2,
    settings: Callable[[int], dict[str, Any]] = lambda index: {},
) -> dict[str, Ledger]:
    """For each delivery mode side by side (its own topics, group and workers): start
    the workers, send for SECONDS while ``inject`` runs, then wait until every request
    is answered; checks the outcome and reports it."""
    pools = []
    for mode in MODES:
        (logs / mode).mkdir(exist_ok=True)
        pool = WorkerPool(broker, await make_topics(broker.bootstrap), logs / mode)
        for index in range(workers):
            pool.add(delivery=mode, **(WORKER_SETTINGS | settings(index)))
        pools.append(pool)
    async with contextlib.AsyncExitStack() as stack:
        for pool in pools:
            await stack.enter_async_context(pool_running(pool))
        traffic = [
            await stack.enter_async_context(
                Traffic(broker.bootstrap, pool.topics, RATE, mode == "exactly_once")
            )
            for pool, mode in zip(pools, MODES, strict=True)
        ]
        started = time.monotonic()
        run = Run(broker, pools)
        injected = await inject(run)
        await asyncio.sleep(max(0.0, SECONDS - (time.monotonic() - started)))
        await asyncio.gather(*(t.stop() for t in traffic))
        ledgers = await asyncio.gather(
            *(
                wait_for_answers(broker.bootstrap, pool.topics, mode == "exactly_once", SETTLE_S)
                for pool, mode in zip(pools, MODES, strict=True)
            )
        )
    for mode, ledger, stream, pool in zip(MODES, ledgers, traffic, pools, strict=True):
        report(name, mode, injected, ledger, stream, pool, recovery(run, stream, started))
    for mode, ledger, pool in zip(MODES, ledgers, pools, strict=True):
        assert not ledger.lost, f"{mode}: {len(ledger.lost)} requests lost\n{pool.logs()}"
        if mode == "exactly_once":
            assert ledger.duplicated == 0, "a read_committed reader saw a reply twice"
    return dict(zip(MODES, ledgers, strict=True))


def recovery(run: Run, traffic: Traffic, started: float) -> dict[str, Any]:
    """Seconds from the start of traffic to each moment the fault marked, and from the
    last mark to the first answer after it and to the last answer of a call sent before
    it: what a long reply delay is made of."""
    if not run.timeline:
        return {}
    last = max(run.timeline.values())
    first = traffic.report.first_answer_after(last)
    backlog = traffic.report.last_answer_of_calls_sent_before(last)
    return {
        "timeline_s": {k: round(v - started, 2) for k, v in run.timeline.items()},
        "first_answer_after_last_mark_s": None if first is None else round(first - last, 2),
        "backlog_answered_after_last_mark_s": None if backlog is None else round(backlog - last, 2),
    }


def report(
    name: str,
    mode: str,
    injected: str,
    ledger: Ledger,
    traffic: Traffic,
    pool: WorkerPool,
    recovered: dict[str, Any],
) -> None:
    row = {
        "scenario": name,
        "delivery": mode,
        "injected": injected,
        "seconds": SECONDS,
        "requests": len(ledger.requests),
        "lost": len(ledger.lost),
        "duplicated": ledger.duplicated,
        "dead_lettered": sum(ledger.dead_letters.values()),
        "error_replies": ledger.error_replies,
        "sdk_ok": traffic.report.ok,
        "sdk_errors": dict(traffic.report.errors),
        "max_reply_delay_s": round(max(traffic.report.latencies_s, default=0.0), 2),
        "worker_crashes": pool.crashes(),
        **recovered,
    }
    print(json.dumps(row))
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------ scenarios


async def test_kill_9_loops_on_random_workers(chaos_broker: ChaosBroker, worker_logs: Path) -> None:
    async def inject(run: Run) -> str:
        kills = max(2, int(SECONDS // 4))
        for n in range(kills):
            await asyncio.sleep(SECONDS / (kills + 1))
            run.signal(n % 2, signal.SIGKILL)
        return f"kill -9 of a worker every {SECONDS / (kills + 1):.1f} s ({kills} kills)"

    await run_scenario(chaos_broker, worker_logs, "kill -9 loop", inject)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
async def test_sigterm_rolling_restart(
    chaos_broker: ChaosBroker, worker_logs: Path, static: bool
) -> None:
    async def inject(run: Run) -> str:
        for index in range(2):
            run.signal(index, signal.SIGTERM)
            await asyncio.sleep(1.0)
            await run.wait_ready(index)
        return "SIGTERM each worker in turn, next once it is ready again"

    def settings(index: int) -> dict[str, Any]:
        return {"group_instance_id": f"chaos-worker-{index}"} if static else {}

    name = f"rolling restart, {'static' if static else 'dynamic'} membership"
    await run_scenario(chaos_broker, worker_logs, name, inject, settings=settings)


async def test_broker_stop_and_start(chaos_broker: ChaosBroker, worker_logs: Path) -> None:
    async def inject(run: Run) -> str:
        await asyncio.sleep(SECONDS / 4)
        run.mark("stopping")
        await asyncio.to_thread(run.broker.stop)
        run.mark("stopped")
        await asyncio.sleep(3.0)
        run.mark("starting")
        await asyncio.to_thread(run.broker.start)
        run.mark("started")
        return "broker stopped (SIGTERM), 3 s down, started again with its data"

    await run_scenario(chaos_broker, worker_logs, "broker stop and start", inject)


async def test_broker_frozen_past_the_session_timeout(
    chaos_broker: ChaosBroker, worker_logs: Path
) -> None:
    async def inject(run: Run) -> str:
        await asyncio.sleep(SECONDS / 4)
        run.broker.pause()
        try:
            await asyncio.sleep(SESSION_TIMEOUT_S + 2)
        finally:
            run.broker.resume()
        return f"broker SIGSTOP for {SESSION_TIMEOUT_S + 2:.0f} s, then SIGCONT"

    await run_scenario(chaos_broker, worker_logs, "broker SIGSTOP", inject)


async def test_a_zombie_worker_paused_past_its_session(
    chaos_broker: ChaosBroker, worker_logs: Path
) -> None:
    async def inject(run: Run) -> str:
        await asyncio.sleep(SECONDS / 4)
        run.signal(0, signal.SIGSTOP)
        await asyncio.sleep(SESSION_TIMEOUT_S + 3)
        run.signal(0, signal.SIGCONT)
        return f"a worker SIGSTOP for {SESSION_TIMEOUT_S + 3:.0f} s, then SIGCONT"

    await run_scenario(chaos_broker, worker_logs, "zombie worker", inject)


async def test_connections_reset_and_latency_added(
    chaos_broker: ChaosBroker, worker_logs: Path
) -> None:
    async def inject(run: Run) -> str:
        proxy, toxics = ChaosBroker.PROXY, run.broker.toxiproxy
        await asyncio.sleep(SECONDS / 5)
        toxics.add_toxic(proxy, "slow", "latency", latency=300, jitter=100)
        await asyncio.sleep(SECONDS / 5)
        toxics.add_toxic(proxy, "reset", "reset_peer", timeout=500)
        await asyncio.sleep(SECONDS / 5)
        toxics.remove_toxic(proxy, "reset")
        toxics.remove_toxic(proxy, "slow")
        toxics.enable(proxy, False)
        await asyncio.sleep(3.0)
        toxics.enable(proxy, True)
        return "300±100 ms latency, then connections reset, then all cut for 3 s (Toxiproxy)"

    await run_scenario(chaos_broker, worker_logs, "network faults", inject)


async def test_a_worker_whose_model_fails_steps_aside(
    chaos_broker: ChaosBroker, worker_logs: Path
) -> None:
    async def inject(run: Run) -> str:
        return "worker 0's model fails for good after 20 requests (restarted each exit)"

    def settings(index: int) -> dict[str, Any]:
        return {"chaos_fail_after": 20} if index == 0 else {}

    ledgers = await run_scenario(
        chaos_broker, worker_logs, "failing model", inject, workers=3, settings=settings
    )
    for ledger in ledgers.values():
        assert ledger.error_replies == 0, "requests the failed model could not score got errors"


async def test_a_poison_record_that_crashes_the_process(
    chaos_broker: ChaosBroker, worker_logs: Path
) -> None:
    poison_id = "chaos-poison"

    async def inject(run: Run) -> str:
        await asyncio.sleep(SECONDS / 4)
        body = {"query": KILL_QUERY, "documents": ["a"]}
        for topics in run.topics:
            await produce_raw(run.broker.bootstrap, topics.requests, [(poison_id, body, {})])
        return "one request that kills any worker process that scores it"

    ledgers = await run_scenario(chaos_broker, worker_logs, "poison record", inject)
    assert all(ledger.dead_letters[poison_id] >= 1 for ledger in ledgers.values())


async def test_a_reply_topic_deleted_mid_run(chaos_broker: ChaosBroker, worker_logs: Path) -> None:
    async def inject(run: Run) -> str:
        teams = [f"{topics.replies}.team" for topics in run.topics]
        admin = AIOKafkaAdminClient(bootstrap_servers=run.broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(team, 1, 1) for team in teams])
            await asyncio.sleep(SECONDS / 4)
            await admin.delete_topics(teams)
        finally:
            await admin.close()
        for topics, team in zip(run.topics, teams, strict=True):
            requests = [
                (f"team-{i}", {"query": "q", "documents": ["a"]}, {"reply-topic": team})
                for i in range(10)
            ]
            await produce_raw(run.broker.bootstrap, topics.requests, requests)
        return "a team's reply topic deleted, then 10 requests naming it"

    ledgers = await run_scenario(chaos_broker, worker_logs, "reply topic deleted", inject)
    for ledger in ledgers.values():
        assert all(ledger.dead_letters[f"team-{i}"] >= 1 for i in range(10))
