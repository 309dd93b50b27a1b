"""The Grafana dashboard and the alert rules ask only for metrics a live /metrics page serves.

The worker's HTTP side-port (``consumer.service.http_server.HealthServer``) is started for real and
scraped over HTTP; every metric name in the dashboard's and the rules' PromQL must be on the
page (``up`` and other series Prometheus makes itself excepted).
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
from metric_names import (
    PROMETHEUS_SYNTHETIC,
    dashboard_queries,
    exported_names,
    exposition_names,
    promql_metric_names,
    rule_queries,
)
from prometheus_client import CollectorRegistry

from consumer.service.http_server import HealthServer
from consumer.service.metrics import Metrics

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "rerank.json"
ALERTS = COMPOSE_DIR / "prometheus" / "alerts.yml"


def _queried_names() -> dict[str, set[str]]:
    """Metric names by the panel or rule that asks for them."""
    queries = dashboard_queries(DASHBOARD) + rule_queries(ALERTS)
    return {where: promql_metric_names(expr) - PROMETHEUS_SYNTHETIC for where, expr in queries}


async def test_every_queried_metric_is_on_the_live_metrics_page() -> None:
    metrics = Metrics(CollectorRegistry())
    # Labelled metrics have no sample before their first event; give each one child.
    exported_names(metrics)
    server = HealthServer("127.0.0.1", 0, readiness=lambda: [], registry=metrics.registry)
    async with (
        server,
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.port}/metrics") as response,
    ):
        assert response.status == 200
        page = await response.text()

    served = exposition_names(page)
    missing = {where: names - served for where, names in _queried_names().items()}
    assert {where: names for where, names in missing.items() if names} == {}
