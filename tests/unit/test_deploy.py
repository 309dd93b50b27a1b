"""Static checks of the deployment files: Dockerfile, compose stacks, Prometheus, Grafana, systemd.

No Docker engine is needed: compose files are merged by ``tests/compose_files.py`` the way
``docker compose -f compose.yml -f OVERRIDE config`` merges them and validated against the
Compose Specification schema that the PyPI package ``check-jsonschema`` vendors (from
compose-spec/compose-spec, Apache-2.0; its license ships beside it in the package). Metric
names in the dashboard and the alert rules are checked against what
``consumer.service.metrics.Metrics`` really exports.
"""

from __future__ import annotations

import configparser
import importlib.resources
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from compose_files import ComposeError, load_stack, read_env_file, volume_target
from metric_names import (
    PROMETHEUS_SYNTHETIC,
    dashboard_queries,
    exported_names,
    promql_metric_names,
    rule_queries,
)

from consumer.app import STOP_GRACE_S
from consumer.settings import Settings, env_name, load_settings
from gateway import settings as gateway_settings

REPO = Path(__file__).resolve().parents[2]
# A dev dependency: a missing schema is a broken install, not a skip.
COMPOSE_SCHEMA = (
    importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
)
COMPOSE_DIR = REPO / "deploy" / "compose"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
PROMETHEUS_DIR = COMPOSE_DIR / "prometheus"
GRAFANA_DIR = COMPOSE_DIR / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "rerank.json"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
SYSTEMD_UNIT = REPO / "deploy" / "systemd" / "rerank-worker@.service"
SYSTEMD_ENV = REPO / "deploy" / "systemd" / "worker.env.example"
DOCKERFILE = REPO / "Dockerfile"
OPERATIONS_DOC = REPO / "docs" / "operations.md"

GPU_STACKS = {
    1: (),
    2: ("compose.gpus-2.yml",),
    4: ("compose.gpus-4.yml",),
    8: ("compose.gpus-8.yml",),
}
CPU_STACK = ("compose.cpu.yml",)
STACKS = {f"gpus-{n}": files for n, files in GPU_STACKS.items()} | {"cpu": CPU_STACK}
# Variables of .env.example that configure the stack, not the worker.
STACK_ONLY_RERANK_VARS = {"RERANK_IMAGE", "RERANK_PARTITIONS", "RERANK_REPLICATION_FACTOR"}
WORKER_PREFIX = "worker-"
TARGETS_MOUNT = "/etc/prometheus/targets/workers.json"
DRAIN_DEFAULT_S = Settings.model_fields["drain_timeout_s"].default


def _stack(files: tuple[str, ...], env: dict[str, str] | None = None) -> dict[str, Any]:
    paths = [COMPOSE_DIR / "compose.yml", *(COMPOSE_DIR / f for f in files)]
    return load_stack(paths, env if env is not None else read_env_file(ENV_EXAMPLE))


def _workers(stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in stack["services"].items() if n.startswith(WORKER_PREFIX)}


def _one_shot(stack: dict[str, Any]) -> set[str]:
    return {n for n, s in stack["services"].items() if s.get("restart") == "no"}


def _seconds(duration: str) -> float:
    """A Compose/systemd duration (``45s``, ``1m30s``, ``60``) in seconds."""
    units = {"h": 3600, "min": 60, "m": 60, "s": 1, "ms": 0.001, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|ms|h|m|s|)", duration.strip())
    assert parts, f"not a duration: {duration!r}"
    return sum(float(value) * units[unit] for value, unit in parts)


def _bind_source(stack: dict[str, Any], service: str, target: str) -> Path:
    for volume in stack["services"][service].get("volumes", []):
        if volume_target(volume) == target:
            return Path(str(volume).split(":")[0])
    raise AssertionError(f"{service} mounts nothing at {target}")


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_names()


# --- compose: schema and merge -------------------------------------------------------------


@pytest.mark.parametrize("files", STACKS.values(), ids=STACKS.keys())
def test_merged_stack_matches_the_compose_schema(
    files: tuple[str, ...], compose_validator: jsonschema.protocols.Validator
) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in compose_validator.iter_errors(_stack(files))
    ]
    assert errors == []


def test_schema_check_catches_a_misspelt_key(
    compose_validator: jsonschema.protocols.Validator,
) -> None:
    stack = _stack(())
    stack["services"]["kafka"]["helthcheck"] = stack["services"]["kafka"]["healthcheck"]
    assert not compose_validator.is_valid(stack)


def test_every_override_file_is_one_of_the_tested_stacks() -> None:
    overrides = {p.name for p in COMPOSE_DIR.glob("compose.*.yml")}
    assert overrides == {f for files in STACKS.values() for f in files}


def test_override_files_only_add_workers_and_their_targets() -> None:
    base = _stack(())
    for n, files in GPU_STACKS.items():
        stack = _stack(files)
        assert set(stack["services"]) - set(base["services"]) == {
            f"{WORKER_PREFIX}gpu{i}" for i in range(1, n)
        }
        for name in ("kafka", "topics", "grafana"):
            assert stack["services"][name] == base["services"][name]


def test_a_missing_required_variable_stops_the_stack() -> None:
    env = read_env_file(ENV_EXAMPLE)
    required = set(re.findall(r"\$\{(\w+):\?", _compose_text()))
    assert required, "the compose files have no ${VAR:?} at all"
    for name in sorted(required):
        without = {k: v for k, v in env.items() if k != name}
        with pytest.raises(ComposeError, match=name):
            _stack(GPU_STACKS[8], without)
        assert name in env, f"{name} is required but .env.example does not set it"


def test_compose_files_use_no_undeclared_variable() -> None:
    env = read_env_file(ENV_EXAMPLE)
    used = set(re.findall(r"\$\{(\w+)", _compose_text()))
    assert used - set(env) == set()


def _compose_text() -> str:
    """The compose files without their comments (which Compose does not interpolate)."""
    text = "\n".join(p.read_text() for p in sorted(COMPOSE_DIR.glob("*.yml")))
    return re.sub(r"(^|\s)#.*$", "", text, flags=re.M)


# --- compose: images, health, order -------------------------------------------------------


@pytest.mark.parametrize("files", STACKS.values(), ids=STACKS.keys())
def test_every_image_is_pinned(files: tuple[str, ...]) -> None:
    for name, service in _stack(files)["services"].items():
        image = service.get("image")
        assert image, f"{name} has no image name (built images need one too, with a tag)"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"


def test_the_compose_broker_is_the_dev_broker_version() -> None:
    script = (REPO / "deploy" / "local" / "kafka").read_text()
    version = re.search(r"KAFKA_VERSION=(\S+)", script)
    assert version is not None
    stack = _stack(())
    assert stack["services"]["kafka"]["image"] == f"apache/kafka:{version.group(1)}"
    assert stack["services"]["topics"]["image"] == stack["services"]["kafka"]["image"]
    assert stack["services"]["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


@pytest.mark.parametrize("files", STACKS.values(), ids=STACKS.keys())
def test_every_long_running_service_has_a_healthcheck(files: tuple[str, ...]) -> None:
    stack = _stack(files)
    for name, service in stack["services"].items():
        if name in _one_shot(stack):
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"


@pytest.mark.parametrize("files", STACKS.values(), ids=STACKS.keys())
def test_start_order_is_gated_on_health_and_success(files: tuple[str, ...]) -> None:
    stack = _stack(files)
    services = stack["services"]
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}"
            else:
                assert condition == "service_completed_successfully", f"{name} -> {dependency}"
                assert dependency in _one_shot(stack)
    for name, worker in _workers(stack).items():
        assert worker["depends_on"]["kafka"]["condition"] == "service_healthy", name
        assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_worker_healthcheck_asks_readiness_with_python() -> None:
    worker = _stack(())["services"]["worker-gpu0"]
    command = " ".join(worker["healthcheck"]["test"])
    assert "/health/ready" in command and "urllib" in command and "curl" not in command


def _stop_window(env_file: Path) -> float:
    """What a stop may take: the drain, then up to STOP_GRACE_S to commit and leave."""
    drain = float(read_env_file(env_file).get("RERANK_DRAIN_TIMEOUT_S", DRAIN_DEFAULT_S))
    return max(drain, DRAIN_DEFAULT_S) + STOP_GRACE_S


def test_workers_get_longer_to_stop_than_the_drain() -> None:
    stack = _stack(GPU_STACKS[8])
    for name, worker in _workers(stack).items():
        grace = _seconds(worker["stop_grace_period"])
        assert grace > _stop_window(ENV_EXAMPLE), name
        assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


@pytest.mark.parametrize("files", STACKS.values(), ids=STACKS.keys())
def test_volumes_are_declared_and_bind_sources_exist(files: tuple[str, ...]) -> None:
    stack = _stack(files)
    declared = set(stack.get("volumes") or {})
    for name, service in stack["services"].items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared"
        build = service.get("build")
        if build:
            context = Path(build["context"])
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name


# --- compose: workers and GPUs --------------------------------------------------------------


@pytest.mark.parametrize("gpus", GPU_STACKS)
def test_each_worker_reserves_its_own_gpu(gpus: int) -> None:
    workers = _workers(_stack(GPU_STACKS[gpus]))
    assert len(workers) == gpus
    for name, worker in workers.items():
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["device_ids"] == [name.removeprefix(f"{WORKER_PREFIX}gpu")], name
        # The container sees its one GPU as cuda:0; a host index here would hide it.
        assert "CUDA_VISIBLE_DEVICES" not in worker.get("environment", {}), name


def test_cpu_override_drops_the_gpu_reservation() -> None:
    (worker,) = _workers(_stack(CPU_STACK)).values()
    assert "deploy" not in worker
    assert worker["environment"]["RERANK_DEVICE"] == "cpu"


def test_workers_reach_kafka_inside_the_compose_network() -> None:
    stack = _stack(GPU_STACKS[8])
    listeners = stack["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for name, worker in _workers(stack).items():
        bootstrap = worker["environment"]["RERANK_BOOTSTRAP_SERVERS"]
        assert f"PLAINTEXT://{bootstrap}" in listeners.split(","), name


def test_the_gateway_serves_the_host_and_is_scraped() -> None:
    stack = _stack(())
    gateway = stack["services"]["gateway"]
    listeners = stack["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"PLAINTEXT://{gateway['environment']['RERANK_BOOTSTRAP_SERVERS']}" in listeners
    assert gateway["entrypoint"] == ["rerank-gateway"]
    port = gateway["environment"]["RERANK_GATEWAY_PORT"]
    assert str(gateway["ports"][0]).endswith(f":{port}")
    assert f"{port}/health/ready" in " ".join(gateway["healthcheck"]["test"])
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["rerank-gateway"]["static_configs"][0]["targets"] == [f"gateway:{port}"]


def test_topics_job_creates_the_topics_the_workers_use() -> None:
    stack = _stack(())
    job = stack["services"]["topics"]["environment"]
    worker_env = {
        **read_env_file(ENV_EXAMPLE),
        **stack["services"]["worker-gpu0"]["environment"],
    }
    for job_key, setting in (
        ("REQUEST_TOPIC", "request_topic"),
        ("REPLY_TOPIC", "reply_topic"),
        ("DLQ_TOPIC", "dlq_topic"),
    ):
        assert job[job_key] == worker_env[env_name(setting)]
    assert int(job["PARTITIONS"]) >= max(GPU_STACKS), "fewer partitions than the largest stack"


def test_create_topics_script_is_valid_bash() -> None:
    script = REPO / "deploy" / "helm" / "kafka-rerank" / "files" / "create-topics.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- .env.example and the worker settings ----------------------------------------------------


def test_env_example_worker_settings_are_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = read_env_file(ENV_EXAMPLE)
    fields = {env_name(f) for f in Settings.model_fields}
    assert STACK_ONLY_RERANK_VARS.isdisjoint(fields)
    gateway_vars = {k for k in env if k.startswith("RERANK_GATEWAY_")}
    gateway_help = gateway_settings.build_parser().format_help()
    assert {k for k in gateway_vars if f"[{k}]" not in gateway_help} == set()
    worker_vars = {k for k in env if k.startswith("RERANK_")} - STACK_ONLY_RERANK_VARS
    worker_vars -= gateway_vars
    assert worker_vars - fields == set(), "unknown RERANK_* settings in .env.example"
    for name in list(os.environ):
        if name.startswith("RERANK_"):
            monkeypatch.delenv(name)
    for name in worker_vars:
        monkeypatch.setenv(name, env[name])
    settings = load_settings([])
    assert settings.model == env["RERANK_MODEL"]


# --- Prometheus -----------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", GPU_STACKS)
def test_prometheus_scrapes_exactly_the_workers_of_the_stack(gpus: int) -> None:
    stack = _stack(GPU_STACKS[gpus])
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "rerank-worker"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["file_sd_configs"]
    assert sd["files"] == [TARGETS_MOUNT]
    groups = json.loads(_bind_source(stack, "prometheus", TARGETS_MOUNT).read_text())
    targets = {t for group in groups for t in group["targets"]}
    expected = {
        f"{name}:{worker['environment']['RERANK_HTTP_PORT']}"
        for name, worker in _workers(stack).items()
    }
    assert targets == expected


def test_prometheus_loads_the_mounted_alert_rules() -> None:
    stack = _stack(())
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert _bind_source(stack, "prometheus", rule_file) == ALERTS.resolve()
    command = " ".join(stack["services"]["prometheus"]["command"])
    config_mount = re.search(r"--config\.file=(\S+)", command)
    assert config_mount is not None
    assert (
        _bind_source(stack, "prometheus", config_mount.group(1))
        == (PROMETHEUS_DIR / "prometheus.yml").resolve()
    )


def test_alert_rules_are_complete(exported: set[str]) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    anchors = _doc_anchors()
    for rule in alerts:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        runbook = rule["annotations"]["runbook"]
        assert runbook == f"docs/operations.md#{rule['alert'].lower()}"
        assert rule["alert"].lower() in anchors, f"docs/operations.md lacks {rule['alert']}"
    # The alerts the deployment promises: lag, errors, workers down or not ready.
    metrics_alerted = set().union(*(promql_metric_names(r["expr"]) for r in alerts))
    for needed in ("rerank_consumer_lag", "rerank_requests_total", "rerank_ready", "up"):
        assert needed in metrics_alerted


def test_every_alert_has_a_promtool_rule_test() -> None:
    # The rule tests run with `promtool test rules` (not installed in CI); this keeps the
    # file complete as alerts are added.
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())
    assert tests["rule_files"] == [ALERTS.name]
    tested = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]}
    firing = {
        case["alertname"]
        for t in tests["tests"]
        for case in t["alert_rule_test"]
        if case["exp_alerts"]
    }
    alerts = {name for name, _ in rule_queries(ALERTS)}
    assert tested == alerts and firing == alerts


def test_alert_rules_ask_for_exported_metrics(exported: set[str]) -> None:
    for name, expr in rule_queries(ALERTS):
        names = promql_metric_names(expr)
        assert names, f"{name}: no metric found in {expr!r}"
        assert names - exported - PROMETHEUS_SYNTHETIC == set(), name


def _doc_anchors() -> set[str]:
    """GitHub-style anchors of the headings of docs/operations.md."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", OPERATIONS_DOC.read_text(), flags=re.M)
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}


# --- Grafana ---------------------------------------------------------------------------------


def test_dashboard_queries_ask_for_exported_metrics(exported: set[str]) -> None:
    queries = dashboard_queries(DASHBOARD)
    assert queries
    for where, expr in queries:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        assert names - exported - PROMETHEUS_SYNTHETIC == set(), where


def test_dashboard_shows_what_operators_need() -> None:
    shown = set().union(*(promql_metric_names(e) for _, e in dashboard_queries(DASHBOARD)))
    needed = {
        "rerank_requests_total",  # requests/s
        "rerank_pairs_total",  # pairs/s
        "rerank_request_latency_seconds_bucket",  # latency percentiles
        "rerank_batch_pairs_bucket",
        "rerank_batch_tokens_bucket",
        "rerank_batch_padding_ratio_sum",
        "rerank_consumer_lag",
        "rerank_errors_total",
        "rerank_dlq_records_total",
        "rerank_gpu_memory_bytes",
        "rerank_consumer_paused",
        "rerank_in_flight_pairs",
    }
    assert needed - shown == set()


def test_dashboard_uses_the_provisioned_data_source() -> None:
    sources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = sources["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        for item in [panel, *panel.get("targets", [])]:
            if "datasource" in item:
                assert item["datasource"]["uid"] == source["uid"], panel["title"]


def test_grafana_loads_the_dashboard_folder() -> None:
    providers = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "rerank.yml").read_text()
    )
    (provider,) = providers["providers"]
    stack = _stack(())
    assert _bind_source(stack, "grafana", provider["options"]["path"]) == DASHBOARD.parent.resolve()
    home = stack["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).name == DASHBOARD.name


def test_promql_reader_finds_metrics_not_functions_or_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{code!="x", i=~"$instance"}'
        "[$__rate_interval]))) / on (job) group_left sum without (x) (b_total offset 5m)"
        " and deriv(c[15m:1m]) > 1e3"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert promql_metric_names('label_values(up{job="w"}, instance)') == {"up"}


# --- Dockerfile -------------------------------------------------------------------------------


def _dockerfile() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """ARG defaults and ``(INSTRUCTION, arguments)`` of the Dockerfile, continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]
    args = {}
    for op, rest in instructions:
        if op == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key.strip()] = value.strip()
    return args, instructions


def _expand(text: str, args: dict[str, str]) -> str:
    """``${ARG}`` replaced by the ARG's default."""
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def test_dockerfile_bases_are_pinned() -> None:
    args, instructions = _dockerfile()
    stages = set()
    for op, rest in instructions:
        if op != "FROM":
            continue
        image = rest.split()[0]
        image = _expand(image, args)
        if image not in stages:
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", image
        if " AS " in rest.upper():
            stages.add(rest.split()[-1])


def test_dockerfile_runs_the_worker_as_a_non_root_user() -> None:
    args, instructions = _dockerfile()
    users = [_expand(rest, args) for op, rest in instructions if op == "USER"]
    assert users, "no USER: the worker would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), user
    entrypoints = [json.loads(rest) for op, rest in instructions if op == "ENTRYPOINT"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoints[-1] == ["rerank-consumer"] and "rerank-consumer" in scripts


def test_dockerfile_health_port_and_model_cache() -> None:
    _, instructions = _dockerfile()
    health = " ".join(rest for op, rest in instructions if op == "HEALTHCHECK")
    assert "/health/ready" in health and "urllib" in health and "curl" not in health
    exposed = {rest for op, rest in instructions if op == "EXPOSE"}
    assert exposed == {str(Settings.model_fields["http_port"].default)}
    env = " ".join(rest for op, rest in instructions if op == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env)
    assert hf_home is not None
    volumes = [json.loads(rest) for op, rest in instructions if op == "VOLUME"]
    assert any(hf_home.group(1) in v for v in volumes)
    # The compose workers mount the named model cache on that same path.
    worker = _stack(())["services"]["worker-gpu0"]
    assert hf_home.group(1) in {volume_target(v) for v in worker["volumes"]}


def test_dockerfile_copies_what_the_build_context_keeps() -> None:
    _, instructions = _dockerfile()
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for op, rest in instructions:
        if op != "COPY" or rest.startswith("--from"):
            continue
        for source in rest.split()[:-1]:
            assert (REPO / source).exists(), source
            assert f"!{source}" in ignore or f"!{source}/" in ignore, source


def test_dockerfile_installs_the_worker_gateway_and_tracing_extras() -> None:
    """``pip install .`` alone is the SDK: the image runs the worker and the gateway too,
    and a worker in it can trace (``RERANK_TRACING=otlp``), as docs/operations.md says."""
    _, instructions = _dockerfile()
    installs = [rest for op, rest in instructions if op == "RUN" and "pip install" in rest]
    assert any('".[worker,gateway,tracing]"' in rest for rest in installs), installs


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    """A package left out of the image installs nothing: its console script fails to import."""
    _, instructions = _dockerfile()
    copied = {rest.split()[0] for op, rest in instructions if op == "COPY"}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert sorted(set(packages) - copied) == []


# --- systemd -----------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(SYSTEMD_UNIT.read_text())
    return parser


def _unit_values(key: str) -> list[str]:
    """Every value of a key that systemd allows more than once (Environment=, ...)."""
    return re.findall(rf"^{key}=(.*)$", SYSTEMD_UNIT.read_text(), flags=re.M)


def test_systemd_unit_restarts_and_drains() -> None:
    service = _unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert _seconds(service["TimeoutStopSec"]) > _stop_window(SYSTEMD_ENV)
    assert service["User"] not in ("root", "0")


def test_systemd_instance_is_the_gpu() -> None:
    environment = _unit_values("Environment")
    assert "CUDA_VISIBLE_DEVICES=%i" in environment
    assert "/etc/rerank/worker.env" in _unit_values("EnvironmentFile")
    assert any(v.startswith("RERANK_HTTP_PORT=") and "%i" in v for v in environment)


def test_systemd_hardening_leaves_the_gpu_reachable() -> None:
    service = _unit()["Service"]
    assert service["NoNewPrivileges"] == "yes"
    for breaks_cuda in ("PrivateDevices", "MemoryDenyWriteExecute", "DevicePolicy"):
        assert breaks_cuda not in service, breaks_cuda


def test_systemd_env_example_sets_only_real_settings() -> None:
    env = read_env_file(SYSTEMD_ENV)
    fields = {env_name(f) for f in Settings.model_fields}
    assert {k for k in env if k.startswith("RERANK_")} - fields == set()
    # The unit sets these per instance; a value in the shared file would win over them.
    assert "CUDA_VISIBLE_DEVICES" not in env and "RERANK_HTTP_PORT" not in env


def test_the_local_brokers_readme_says_what_its_script_does() -> None:
    """It said every start wipes the data, while the script keeps it across restarts."""
    script = (REPO / "deploy" / "local" / "kafka").read_text()
    readme = (REPO / "deploy" / "local" / "README.md").read_text()
    usage = re.search(r"# Usage: deploy/local/kafka ([a-z|]+)", script)
    assert usage is not None
    for command in usage.group(1).split("|"):
        assert f"deploy/local/kafka {command}" in readme, command
    assert "nothing survives a restart" not in readme and "wiped each start" not in readme
    assert "kept" in readme
