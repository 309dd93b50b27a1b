"""The HTTP side-port, served for real on a free local port, with fake readiness."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from consumer.service.http_server import HealthServer
from consumer.service.metrics import Metrics


class FakeReadiness:
    """Readiness whose reasons a test sets."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons
        self.calls = 0

    def __call__(self) -> list[str]:
        self.calls += 1
        return list(self.reasons)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


@pytest.fixture
async def started() -> AsyncIterator[list[HealthServer]]:
    """Servers a test starts; all stopped afterwards."""
    servers: list[HealthServer] = []
    yield servers
    for server in servers:
        await server.stop()


async def start_server(
    servers: list[HealthServer],
    readiness: Callable[[], list[str]],
    registry: CollectorRegistry,
    on_scrape: Callable[[], None] | None = None,
) -> str:
    server = HealthServer("127.0.0.1", 0, readiness, registry, on_scrape=on_scrape)
    await server.start()
    servers.append(server)
    return f"http://127.0.0.1:{server.port}"


async def test_live_answers_while_not_ready(started, session) -> None:
    base = await start_server(started, FakeReadiness(["model loading"]), CollectorRegistry())

    async with session.get(f"{base}/health/live") as response:
        assert response.status == 200
        assert await response.json() == {"status": "live"}


async def test_ready_lists_every_reason_with_503(started, session) -> None:
    reasons = ["model loading", "consumer not in its group"]
    base = await start_server(started, FakeReadiness(reasons), CollectorRegistry())

    async with session.get(f"{base}/health/ready") as response:
        assert response.status == 503
        assert await response.json() == {"status": "not_ready", "reasons": reasons}


async def test_ready_follows_the_readiness_function(started, session) -> None:
    readiness = FakeReadiness(["model loading"])
    base = await start_server(started, readiness, CollectorRegistry())

    async with session.get(f"{base}/health/ready") as response:
        assert response.status == 503
    readiness.reasons = []
    async with session.get(f"{base}/health/ready") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ready"}
    assert readiness.calls == 2


async def test_a_failing_readiness_check_means_not_ready(started, session) -> None:
    def broken() -> list[str]:
        raise RuntimeError("engine gone")

    base = await start_server(started, broken, CollectorRegistry())

    async with session.get(f"{base}/health/ready") as response:
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "not_ready"
    assert any("engine gone" in reason for reason in body["reasons"])


async def test_metrics_shows_counters_as_they_move(started, session) -> None:
    metrics = Metrics(CollectorRegistry())
    base = await start_server(started, FakeReadiness([]), metrics.registry)

    metrics.requests.labels(outcome="ok").inc(3)
    metrics.pairs.inc(12)
    first = await scrape(session, base)
    metrics.requests.labels(outcome="ok").inc()
    second = await scrape(session, base)

    assert first[("rerank_requests_total", (("outcome", "ok"),))] == 3
    assert first[("rerank_pairs_total", ())] == 12
    assert second[("rerank_requests_total", (("outcome", "ok"),))] == 4


async def test_metrics_content_type_is_prometheus_text(started, session) -> None:
    base = await start_server(started, FakeReadiness([]), Metrics(CollectorRegistry()).registry)

    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert "version=" in response.headers["Content-Type"]
        text = await response.text()
    assert "# TYPE rerank_requests_total counter" in text


async def test_on_scrape_runs_before_each_metrics_answer(started, session) -> None:
    metrics = Metrics(CollectorRegistry())
    scrapes = 0

    def refresh() -> None:
        nonlocal scrapes
        scrapes += 1
        metrics.gpu_memory.labels(kind="allocated").set(scrapes * 1024)

    base = await start_server(started, FakeReadiness([]), metrics.registry, on_scrape=refresh)

    await scrape(session, base)
    values = await scrape(session, base)

    assert values[("rerank_gpu_memory_bytes", (("kind", "allocated"),))] == 2 * 1024


async def test_a_failing_scrape_hook_still_serves_metrics(started, session) -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.pairs.inc(5)

    def broken() -> None:
        raise RuntimeError("no gpu")

    base = await start_server(started, FakeReadiness([]), metrics.registry, on_scrape=broken)

    values = await scrape(session, base)
    assert values[("rerank_pairs_total", ())] == 5


async def test_unknown_path_is_404(started, session) -> None:
    base = await start_server(started, FakeReadiness([]), CollectorRegistry())

    async with session.get(f"{base}/nope") as response:
        assert response.status == 404


async def test_start_fails_on_a_taken_port(started) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HealthServer("127.0.0.1", port, FakeReadiness([]), CollectorRegistry())
        with pytest.raises(OSError):
            await server.start()
        await server.stop()  # stopping a server that never started is harmless


async def test_stop_closes_the_port(session) -> None:
    server = HealthServer("127.0.0.1", 0, FakeReadiness([]), CollectorRegistry())
    async with server:
        base = f"http://127.0.0.1:{server.port}"
        async with session.get(f"{base}/health/live") as response:
            assert response.status == 200

    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(f"{base}/health/live"):
            pass


async def scrape(
    session: aiohttp.ClientSession, base: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` by (name, sorted labels)."""
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
