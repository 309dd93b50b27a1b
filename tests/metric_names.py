"""Metric names: what the service exports, and what PromQL expressions ask for.

Shared by the deploy tests (dashboard and alert rules vs ``consumer/service/metrics.py``) and the
live ``/metrics`` check in the integration tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from consumer.service.metrics import Metrics

# Series Prometheus makes itself for every target; not exported by the service.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*(?![\w(])(?!\s*\()")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*\w+\s*\)\s*$", re.S)


def exposition_names(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (``rerank_pairs_total``, ...)."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def exported_names(metrics: Metrics | None = None) -> set[str]:
    """Every sample name a :class:`Metrics` registry exports once each metric has a sample.

    Labelled metrics show no sample until a child exists, so each gets one child first
    (label names from the wrapper; prometheus_client has no public accessor for them).
    """
    metrics = metrics if metrics is not None else Metrics(CollectorRegistry())
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["probe"] * len(metric._labelnames))
    return exposition_names(generate_latest(metrics.registry).decode())


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords left out).

    A static reading, good for the expressions of our dashboards and rules: strings,
    label matchers, ranges, grouping clauses and Grafana ``$variables`` are cut out first,
    then every remaining identifier that is not a function call or keyword is a metric.
    """
    label_values = _LABEL_VALUES.match(expr)
    if label_values:
        expr = label_values.group("selector")
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    text = _GRAFANA_VARIABLES.sub("", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """``(where, expr)`` for every query of a Grafana dashboard JSON (panels, variables)."""
    dashboard = json.loads(path.read_text())
    return list(_panel_queries(dashboard.get("panels", []))) + list(_variable_queries(dashboard))


def _panel_queries(panels: Iterable[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for panel in panels:
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
        yield from _panel_queries(panel.get("panels", []))


def _variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if query:
            yield f"variable {variable.get('name')!r}", query


def rule_queries(path: Path) -> list[tuple[str, str]]:
    """``(alert or record name, expr)`` for every rule of a Prometheus rules file."""
    rules = yaml.safe_load(path.read_text())
    return [
        (rule.get("alert") or rule.get("record"), rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]
