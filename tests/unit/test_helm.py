"""The Helm chart, deploy/helm/kafka-rerank: lint, render, validate, and what a user relies on.

Helm is the binary that ``deploy/local/helm fetch`` builds once into the cache (scripts/test.sh
runs it); a missing helm fails these tests, it does not skip them. Every example values file
is linted and rendered, and every rendered object is validated offline: core kinds with the
PyPI package ``kubernetes-validate`` (strict: unknown fields fail) for the oldest Kubernetes
the chart supports and a current one; KEDA's and the Prometheus Operator's kinds against the
``openAPIV3Schema`` of their upstream CRDs (deploy/helm/crd-schemas/, with unknown fields
refused the way the API server's strict field validation refuses them).

The rest checks behaviour: static membership from the pod name, GPU limits, probes on the
worker's side-port, a grace period that covers the drain, the worker and the gateway
accepting the environment the chart gives them, secrets only by reference, the KEDA trigger,
the alert rules and the topic script equal to the compose stack's.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from consumer.app import STOP_GRACE_S
from consumer.settings import Settings, env_name, load_settings
from gateway import settings as gateway_settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kafka-rerank"
EXAMPLES_DIR = CHART / "examples"
EXAMPLES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.yaml"))
CRD_DIR = REPO / "deploy" / "helm" / "crd-schemas"
HELM_SCRIPT = REPO / "deploy" / "local" / "helm"
COMPOSE_ALERTS = REPO / "deploy" / "compose" / "prometheus" / "alerts.yml"
TOPICS_SCRIPT = CHART / "files" / "create-topics.sh"
COMPOSE_FILE = REPO / "deploy" / "compose" / "compose.yml"
E2E_H200 = REPO / "benchmarks" / "results" / "2026-12-04-e2e-h200" / "run1" / "results.json"

# The oldest Kubernetes the chart is checked against and a current release (schemas of
# kubernetes-validate).
KUBE_VERSIONS = ("1.27.0", "1.37.0")
CORE_KINDS = frozenset(
    {
        "ServiceAccount",
        "Service",
        "StatefulSet",
        "Deployment",
        "PodDisruptionBudget",
        "Job",
        "Secret",
    }
)
CRD_FILES = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
GPU_EXAMPLES = ("gpu-1", "gpu-8", "sasl-ssl")
BROKER = "kafka.test.svc:9092"
RELEASE = "rr"

Manifest = dict[str, Any]


# --- helm -----------------------------------------------------------------------------------


@functools.cache
def helm_binary() -> str:
    """The cached helm; a failure (not a skip) when deploy/local/helm has not fetched it."""
    found = subprocess.run(
        [str(HELM_SCRIPT), "path"], capture_output=True, text=True, timeout=30, check=False
    )
    if found.returncode != 0 or not found.stdout.strip():
        pytest.fail(
            f"helm is missing: run `{HELM_SCRIPT.relative_to(REPO)} fetch` "
            "(scripts/test.sh does) and run the tests again"
        )
    return found.stdout.strip()


@functools.cache
def _helm_home() -> Path:
    # helm's own cache/config/data folders: kept out of the user's home, under the
    # project's cache like the binary.
    cache = Path(os.environ.get("RERANK_CACHE_DIR", Path.home() / ".cache" / "kafka-rerank"))
    home = cache / "helm-home"
    home.mkdir(parents=True, exist_ok=True)
    return home


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    home = _helm_home()
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def _template_args(example: str | None, sets: tuple[str, ...]) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", "rerank"]
    if example is not None:
        args += ["-f", str(EXAMPLES_DIR / f"{example}.yaml")]
    else:
        args += ["--set", f"kafka.bootstrapServers={BROKER}"]
    for item in sets:
        args += ["--set", item]
    return args


@functools.cache
def _render(example: str | None, sets: tuple[str, ...]) -> tuple[Manifest, ...]:
    done = helm(*_template_args(example, sets))
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def render(example: str | None = None, *sets: str) -> list[Manifest]:
    """The objects `helm template` makes: an example values file (None: the defaults with
    a broker) plus --set overrides. A deep copy, so a test may change it."""
    return copy.deepcopy(list(_render(example, sets)))


def render_error(*sets: str) -> str:
    done = helm(*_template_args(None, sets))
    assert done.returncode != 0, "expected helm template to refuse these values"
    return done.stderr


def one(manifests: list[Manifest], kind: str, component: str | None = None) -> Manifest:
    found = [
        m
        for m in manifests
        if m["kind"] == kind
        and (
            component is None
            or m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]
    assert len(found) == 1, f"{len(found)} {kind} ({component}) objects"
    return found[0]


def kinds(manifests: list[Manifest]) -> set[str]:
    return {m["kind"] for m in manifests}


def container(workload: Manifest) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(workload: Manifest) -> dict[str, dict[str, Any]]:
    """The container's env by name (a name set twice would be ambiguous: refused)."""
    entries = container(workload).get("env", [])
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"env set twice: {names}"
    return {e["name"]: e for e in entries}


def literal_env(workload: Manifest) -> dict[str, str]:
    return {k: e["value"] for k, e in env_of(workload).items() if "value" in e}


def worker(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "StatefulSet", "worker")


def gateway(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment", "gateway")


# --- schemas --------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server's strict validation does:
    every object with listed properties and no other rule for extra keys gets
    additionalProperties: false. Patterns are made Python's."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if isinstance(out.get("pattern"), str):
        # Go's regexp takes a flag group anywhere; Python's only at the very start.
        out["pattern"] = re.sub(r"^\^\(\?([a-z]+)\)", r"(?\1)^", out["pattern"])
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((CRD_DIR / CRD_FILES[(api_version, kind)]).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(served["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def validate(manifest: Manifest) -> None:
    kind = manifest["kind"]
    if kind in CORE_KINDS:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)
        return
    key = (manifest["apiVersion"], kind)
    assert key in CRD_FILES, f"no schema for {key}: add its CRD to {CRD_DIR.relative_to(REPO)}"
    crd_validator(*key).validate(manifest)


# --- lint and validation ------------------------------------------------------------------


def test_examples_are_the_documented_set() -> None:
    assert set(EXAMPLES) == {"cpu-only", "gpu-1", "gpu-8", "sasl-ssl"}


def test_helm_lint_with_the_defaults() -> None:
    done = helm("lint", str(CHART), "--set", f"kafka.bootstrapServers={BROKER}", "--strict")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("example", EXAMPLES)
def test_helm_lint_with_each_example(example: str) -> None:
    done = helm("lint", str(CHART), "-f", str(EXAMPLES_DIR / f"{example}.yaml"), "--strict")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("example", [None, *EXAMPLES])
def test_every_rendered_object_is_valid(example: str | None) -> None:
    manifests = render(example)
    assert {"StatefulSet", "Service", "PodDisruptionBudget", "Job"} <= kinds(manifests)
    for manifest in manifests:
        validate(manifest)


def test_the_crd_check_refuses_a_misspelt_field() -> None:
    scaled = one(render("sasl-ssl"), "ScaledObject")
    scaled["spec"]["maxReplicas"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        validate(scaled)


def test_the_core_check_refuses_a_misspelt_field() -> None:
    statefulset = worker(render())
    statefulset["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(statefulset)


def test_the_examples_turn_on_every_optional_part() -> None:
    rendered = {example: kinds(render(example)) for example in EXAMPLES}
    assert {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"} <= set(
        rendered["sasl-ssl"]
    )
    assert {"ServiceMonitor", "PrometheusRule"} <= rendered["gpu-8"]
    # Off by default: a cluster without KEDA or the Prometheus Operator installs the chart.
    assert kinds(render()).isdisjoint(
        {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
    )


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("kafka.bootstrapServers=",), "kafka.bootstrapServers is required"),
        (("kafka.security.protocol=SASL_SSL",), "kafka.security.sasl.existingSecret is required"),
        (("kafka.security.protocol=TLS",), "kafka.security.protocol must be"),
        (
            ("kafka.security.protocol=SASL_SSL", "kafka.security.sasl.existingSecret=s",
             "kafka.security.sasl.mechanism=GSSAPI"),
            "kafka.security.sasl.mechanism must be",
        ),
        (("worker.env.RERANK_HTTP_PORT=9000",), "set worker.httpPort instead"),
        (("worker.env.RERANK_GROUP_INSTANCE_ID=x",), "set worker.staticMembership instead"),
        (("gateway.env.RERANK_BOOTSTRAP_SERVERS=x",), "set kafka.bootstrapServers instead"),
        (("worker.terminationGracePeriodSeconds=40",), "must exceed worker.drainTimeoutS + 10"),
        (("worker.replicas=9",), "more than topics.partitions"),
        (("keda.enabled=true", "keda.maxReplicaCount=9"), "more than topics.partitions"),
    ],
)  # fmt: skip
def test_settings_that_cannot_work_are_refused_at_render_time(
    sets: tuple[str, ...], message: str
) -> None:
    assert message in render_error(*sets)


# --- workers --------------------------------------------------------------------------------


@pytest.mark.parametrize("example", [None, *GPU_EXAMPLES])
def test_group_instance_id_is_the_pod_name(example: str | None) -> None:
    entry = env_of(worker(render(example)))["RERANK_GROUP_INSTANCE_ID"]
    assert entry == {
        "name": "RERANK_GROUP_INSTANCE_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }


def test_static_membership_can_be_turned_off() -> None:
    manifests = render(None, "worker.staticMembership=false")
    assert "RERANK_GROUP_INSTANCE_ID" not in env_of(worker(manifests))


def test_static_membership_outlasts_a_restart() -> None:
    # The worker's default session timeout (10 s) is shorter than a pod's restart; with
    # static membership the chart gives a restarted pod time to come back to its partitions.
    env = literal_env(worker(render()))
    assert int(env["RERANK_SESSION_TIMEOUT_MS"]) >= 60_000
    assert (
        int(env["RERANK_SESSION_TIMEOUT_MS"]) > Settings.model_fields["session_timeout_ms"].default
    )


def test_workers_are_a_statefulset_with_a_headless_service() -> None:
    manifests = render("gpu-8")
    statefulset = worker(manifests)
    service = one(manifests, "Service", "worker")
    assert statefulset["spec"]["replicas"] == 8
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    # Prometheus must still scrape a worker that is not ready.
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"


@pytest.mark.parametrize("example", GPU_EXAMPLES)
def test_each_gpu_worker_asks_for_one_gpu(example: str) -> None:
    statefulset = worker(render(example))
    resources = container(statefulset)["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert literal_env(statefulset)["RERANK_DEVICE"] == "cuda"
    # Inside the pod its GPU is cuda:0: CUDA_VISIBLE_DEVICES would hide it.
    assert "CUDA_VISIBLE_DEVICES" not in env_of(statefulset)


def test_the_gpu_count_and_resource_name_are_values() -> None:
    manifests = render(None, "worker.gpu.count=2", "worker.gpu.resourceName=amd.com/gpu")
    limits = container(worker(manifests))["resources"]["limits"]
    assert str(limits["amd.com/gpu"]) == "2"
    assert "nvidia.com/gpu" not in limits


def test_cpu_only_asks_for_no_gpu_and_runs_on_cpu() -> None:
    manifests = render("cpu-only")
    text = json.dumps(manifests)
    assert "nvidia.com/gpu" not in text
    statefulset = worker(manifests)
    env = literal_env(statefulset)
    assert env["RERANK_DEVICE"] == "cpu"
    requested = container(statefulset)["resources"]["requests"]["cpu"]
    assert env["OMP_NUM_THREADS"] == str(requested)
    assert env["RERANK_TOKENIZER_THREADS"] == str(requested)


def test_worker_runs_rerank_consumer_and_gateway_runs_rerank_gateway() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    manifests = render()
    assert container(worker(manifests))["command"] == ["rerank-consumer"]
    assert container(gateway(manifests))["command"] == ["rerank-gateway"]
    assert {"rerank-consumer", "rerank-gateway"} <= set(scripts)
    assert 'ENTRYPOINT ["rerank-consumer"]' in (REPO / "Dockerfile").read_text()


@pytest.mark.parametrize(("sets", "port"), [((), 8080), (("worker.httpPort=9100",), 9100)])
def test_worker_probes_ask_the_side_port(sets: tuple[str, ...], port: int) -> None:
    manifests = render(None, *sets)
    statefulset = worker(manifests)
    main = container(statefulset)
    assert main["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert literal_env(statefulset)["RERANK_HTTP_PORT"] == str(port)
    assert literal_env(statefulset)["RERANK_HTTP_HOST"] == "0.0.0.0"
    probes = {
        name: main[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": {"path": "/health/ready", "port": "http"},
        "livenessProbe": {"path": "/health/live", "port": "http"},
        "readinessProbe": {"path": "/health/ready", "port": "http"},
    }
    assert one(manifests, "Service", "worker")["spec"]["ports"][0]["port"] == port
    if not sets:  # the chart's default is the worker's own
        assert port == Settings.model_fields["http_port"].default


def test_the_startup_probe_allows_a_cold_model_load() -> None:
    startup = container(worker(render()))["startupProbe"]
    # The compose health check's start period: a first start downloads and compiles.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize("drain", [30, 90.5])
def test_the_grace_period_covers_the_drain_commit_and_leave(drain: float) -> None:
    statefulset = worker(render(None, f"worker.drainTimeoutS={drain}"))
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert float(literal_env(statefulset)["RERANK_DRAIN_TIMEOUT_S"]) == drain
    assert grace > drain + STOP_GRACE_S


def test_the_default_grace_is_the_default_drain_plus_margin() -> None:
    statefulset = worker(render())
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = Settings.model_fields["drain_timeout_s"].default
    assert float(literal_env(statefulset)["RERANK_DRAIN_TIMEOUT_S"]) == drain
    assert drain + STOP_GRACE_S < grace <= drain + STOP_GRACE_S + 10


def test_pdb_lets_one_worker_go_at_a_time() -> None:
    manifests = render()
    pdb = one(manifests, "PodDisruptionBudget", "worker")
    assert pdb["spec"]["maxUnavailable"] == 1
    pod_labels = worker(manifests)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_worker_env_values_are_strings_without_exponents() -> None:
    manifests = render(None, "worker.env.RERANK_MAX_UNCOMMITTED_RECORDS=1200000000")
    env = literal_env(worker(manifests))
    assert env["RERANK_MAX_UNCOMMITTED_RECORDS"] == "1200000000"
    job = one(manifests, "Job", "topics")
    assert literal_env(job)["DLQ_RETENTION_MS"] == "1209600000"


def _resolved_env(
    workload: Manifest, tmp_path: Path, ca_file: Path | None = None
) -> dict[str, str]:
    """The container's env as the kubelet would give it: secrets and the pod name
    stand-ins, files under the TLS mount made in tmp_path."""
    mounts = {m["name"]: m["mountPath"] for m in container(workload).get("volumeMounts", [])}
    tls_dir = mounts.get("kafka-tls")
    values: dict[str, str] = {}
    for name, entry in env_of(workload).items():
        if "value" in entry:
            value = entry["value"]
        elif "secretKeyRef" in entry["valueFrom"]:
            value = f"secret-{entry['valueFrom']['secretKeyRef']['key']}"
        else:
            assert entry["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
            value = f"{workload['metadata']['name']}-0"
        if tls_dir and value.startswith(tls_dir + "/"):
            local = tmp_path / Path(value).name
            if ca_file is not None:
                shutil.copy(ca_file, local)
            else:
                local.write_text("stand-in")
            value = str(local)
        values[name] = value
    return values


def _clean_rerank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RERANK_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("example", [None, *EXAMPLES])
def test_the_worker_accepts_its_environment(
    example: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statefulset = worker(render(example))
    env = _resolved_env(statefulset, tmp_path)
    rerank = {k: v for k, v in env.items() if k.startswith("RERANK_")}
    fields = {env_name(f) for f in Settings.model_fields}
    assert set(rerank) - fields == set(), "variables the worker does not read"
    _clean_rerank_env(monkeypatch)
    for name, value in rerank.items():
        monkeypatch.setenv(name, value)
    settings = load_settings([])  # raises SettingsError with every problem
    assert settings.bootstrap_servers == literal_env(statefulset)["RERANK_BOOTSTRAP_SERVERS"]
    assert settings.group_instance_id in (None, f"{statefulset['metadata']['name']}-0")


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway self-signed CA, so the gateway can build its SSL context."""
    folder = tmp_path_factory.mktemp("ca")
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=test-ca", "-days", "1",
         "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.pem")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return folder / "ca.pem"


@pytest.mark.parametrize("example", [None, *EXAMPLES])
def test_the_gateway_accepts_its_environment(
    example: str | None, tmp_path: Path, ca_pem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = gateway(render(example))
    env = _resolved_env(deployment, tmp_path, ca_file=ca_pem)
    help_text = gateway_settings.build_parser().format_help()
    security = {
        env_name(f) for f in Settings.model_fields if f.startswith(("security", "sasl", "ssl"))
    }
    # The token is read from the environment only (no flag, so not in --help).
    known = security | {"RERANK_GATEWAY_API_TOKEN"}
    unknown = {
        k for k in env if k.startswith("RERANK_") and f"[{k}]" not in help_text and k not in known
    }
    assert unknown == set(), "variables the gateway does not read"
    _clean_rerank_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parsed = gateway_settings.parse_settings([])
    assert parsed.port == container(deployment)["ports"][0]["containerPort"] == 8080
    assert (
        parsed.bootstrap_servers == literal_env(worker(render(example)))["RERANK_BOOTSTRAP_SERVERS"]
    )
    assert parsed.max_concurrency == 512
    assert parsed.api_token is not None  # auth is on unless turned off


# --- gateway --------------------------------------------------------------------------------


def test_gateway_is_a_deployment_with_a_service_and_probes() -> None:
    manifests = render(None, "gateway.replicas=3", "gateway.port=8081")
    deployment = gateway(manifests)
    service = one(manifests, "Service", "gateway")
    main = container(deployment)
    assert deployment["spec"]["replicas"] == 3
    assert main["ports"] == [{"name": "http", "containerPort": 8081, "protocol": "TCP"}]
    assert literal_env(deployment)["RERANK_GATEWAY_PORT"] == "8081"
    assert main["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # The gateway and the workers use the same topics and group.
    worker_env, gateway_env = literal_env(worker(manifests)), literal_env(deployment)
    for name in ("RERANK_REQUEST_TOPIC", "RERANK_REPLY_TOPIC", "RERANK_GROUP_ID"):
        assert gateway_env[name] == worker_env[name]


def test_gateway_can_be_left_out() -> None:
    manifests = render(None, "gateway.enabled=false")
    assert all(
        m["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "gateway"
        for m in manifests
    )


def test_gateway_token_comes_from_a_secret() -> None:
    entry = env_of(gateway(render("sasl-ssl")))["RERANK_GATEWAY_API_TOKEN"]
    assert entry["valueFrom"]["secretKeyRef"] == {"name": "kafka-rerank-gateway", "key": "token"}
    named = render("sasl-ssl")
    assert not [m for m in named if m["kind"] == "Secret" and "token" in m["metadata"]["name"]]


def test_gateway_auth_is_on_by_default_with_a_token_of_the_charts_own() -> None:
    """Auth was off unless a Secret was named, and the gateway listens on every address:
    whoever reached the Service used the GPUs."""
    manifests = render()
    entry = env_of(gateway(manifests))["RERANK_GATEWAY_API_TOKEN"]
    ref = entry["valueFrom"]["secretKeyRef"]
    (secret,) = [
        m for m in manifests if m["kind"] == "Secret" and m["metadata"]["name"] == ref["name"]
    ]
    token = base64.b64decode(secret["data"][ref["key"]])
    assert len(token) >= 32
    assert "RERANK_GATEWAY_API_TOKEN" not in env_of(
        gateway(render(None, "gateway.auth.enabled=false"))
    )


def test_gateway_waits_in_the_topic_when_workers_scale_to_zero() -> None:
    scaled = render(None, "keda.enabled=true", "keda.minReplicaCount=0")
    assert literal_env(gateway(scaled))["RERANK_GATEWAY_CHECK_WORKERS_S"] == "0"
    assert "RERANK_GATEWAY_CHECK_WORKERS_S" not in env_of(
        gateway(render(None, "keda.enabled=true"))
    )


# --- security -------------------------------------------------------------------------------


def _workloads(manifests: list[Manifest]) -> Iterator[Manifest]:
    return (m for m in manifests if m["kind"] in ("StatefulSet", "Deployment", "Job"))


def test_sasl_credentials_come_from_secret_references() -> None:
    manifests = render("sasl-ssl")
    for workload in _workloads(manifests):
        env = env_of(workload)
        password = env.get("RERANK_SASL_PASSWORD") or env["SASL_PASSWORD"]
        assert "value" not in password
        assert password["valueFrom"]["secretKeyRef"] == {
            "name": "kafka-rerank-sasl",
            "key": "password",
        }
        username = env.get("RERANK_SASL_USERNAME") or env["SASL_USERNAME"]
        assert username["valueFrom"]["secretKeyRef"]["name"] == "kafka-rerank-sasl"
    statefulset = literal_env(worker(manifests))
    assert statefulset["RERANK_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert statefulset["RERANK_SASL_MECHANISM"] == "SCRAM-SHA-512"


@pytest.mark.parametrize("example", [None, *EXAMPLES])
def test_no_secret_is_ever_a_literal(example: str | None) -> None:
    secretish = re.compile(r"(PASSWORD|TOKEN|SECRET)$")
    for workload in _workloads(render(example)):
        for name, entry in env_of(workload).items():
            if secretish.search(name):
                assert "value" not in entry, f"{workload['kind']} {name} is a literal"


def test_the_ca_is_a_file_mounted_from_its_secret() -> None:
    manifests = render("sasl-ssl")
    for workload in _workloads(manifests):
        pod = workload["spec"]["template"]["spec"]
        (mount,) = [m for m in container(workload)["volumeMounts"] if m["name"] == "kafka-tls"]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == "kafka-tls"]
        (source,) = volume["projected"]["sources"]
        assert source["secret"] == {
            "name": "kafka-ca",
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
        }
        if workload["kind"] != "Job":
            assert literal_env(workload)["RERANK_SSL_CAFILE"] == f"{mount['mountPath']}/ca.crt"


def test_mutual_tls_mounts_the_client_certificate() -> None:
    manifests = render(
        None,
        "kafka.security.protocol=SSL",
        "kafka.security.tls.clientCertSecret.name=rerank-client",
        "kafka.security.tls.clientCertSecret.passwordKey=key-password",
    )
    statefulset = worker(manifests)
    env = env_of(statefulset)
    assert env["RERANK_SSL_CERTFILE"]["value"].endswith("/client.crt")
    assert env["RERANK_SSL_KEYFILE"]["value"].endswith("/client.key")
    assert env["RERANK_SSL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "rerank-client",
        "key": "key-password",
    }
    assert "RERANK_SSL_CAFILE" not in env  # no CA Secret: the system CAs
    for manifest in manifests:
        validate(manifest)


# --- topics ---------------------------------------------------------------------------------


def test_the_chart_and_the_compose_stack_run_one_topic_script() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    (mount,) = compose["services"]["topics"]["volumes"]
    source = mount.split(":")[0]
    assert (COMPOSE_FILE.parent / source).resolve() == TOPICS_SCRIPT.resolve()
    job = one(render(), "Job", "topics")
    assert literal_env(job)["CREATE_TOPICS_SH"] == TOPICS_SCRIPT.read_text()


def test_topics_job_is_a_hook_that_makes_the_workers_topics() -> None:
    manifests = render("gpu-8")
    job = one(manifests, "Job", "topics")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    assert container(job)["image"] == "apache/kafka:4.1.1"
    env, worker_env = literal_env(job), literal_env(worker(manifests))
    assert env["REQUEST_TOPIC"] == worker_env["RERANK_REQUEST_TOPIC"] == "rerank.requests"
    assert env["REPLY_TOPIC"] == worker_env["RERANK_REPLY_TOPIC"] == "rerank.replies"
    assert env["DLQ_TOPIC"] == worker_env["RERANK_DLQ_TOPIC"] == "rerank.requests.dlq"
    assert env["BOOTSTRAP_SERVERS"] == worker_env["RERANK_BOOTSTRAP_SERVERS"]
    assert (env["PARTITIONS"], env["REPLICATION_FACTOR"]) == ("48", "3")
    assert env["REPLY_PARTITIONS"] == env["DLQ_PARTITIONS"] == "48"


def _run_topics_job(job: Manifest, tmp_path: Path, secrets: dict[str, str]) -> dict[str, str]:
    """Runs the Job's command with bash and a stand-in kafka-topics.sh that records its
    arguments and the client properties it was given; returns those properties."""
    kafka_bin = tmp_path / "bin"
    kafka_bin.mkdir()
    record = tmp_path / "calls.txt"
    stub = kafka_bin / "kafka-topics.sh"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {record}\n'
        'prev=""; for a in "$@"; do [[ $prev == --command-config ]] && '
        f'cp "$a" {tmp_path}/client.properties; prev=$a; done\n'
        'if [[ " $* " == *" --describe "* ]]; then echo "Topic: t PartitionCount: 16"; fi\n'
    )
    stub.chmod(0o755)
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    (tls_dir / "ca.crt").write_text("CA")
    env = {"PATH": os.environ["PATH"]}
    for name, entry in env_of(job).items():
        if "value" in entry:
            env[name] = entry["value"]
        else:
            env[name] = secrets[entry["valueFrom"]["secretKeyRef"]["key"]]
    env |= {"KAFKA_BIN": str(kafka_bin), "TLS_DIR": str(tls_dir)}
    command = container(job)["command"]
    assert command[:2] == ["bash", "-c"]
    # The script writes /tmp/client.properties; point /tmp at the test's folder.
    script = command[2].replace("/tmp/", f"{tmp_path}/")
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    calls = record.read_text().splitlines()
    created = [c for c in calls if "--create" in c]
    assert len(created) == 3 and all("--command-config" in c for c in created)
    lines = (tmp_path / "client.properties").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_topics_job_logs_in_with_sasl_ssl(tmp_path: Path) -> None:
    job = one(render("sasl-ssl"), "Job", "topics")
    password = 'p"a\\ss w=rd'
    props = _run_topics_job(job, tmp_path, {"username": "rerank", "password": password})
    assert props["security.protocol"] == "SASL_SSL"
    assert props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert props["ssl.truststore.type"] == "PEM"
    assert props["ssl.truststore.location"] == f"{tmp_path}/tls/ca.crt"
    # Read back as java.util.Properties does (a backslash escapes the next character), the
    # JAAS string holds the password with its quote and backslash escaped.
    jaas = re.sub(r"\\(.)", r"\1", props["sasl.jaas.config"])
    assert jaas == (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        'username="rerank" password="p\\"a\\\\ss w=rd";'
    )


# --- monitoring -----------------------------------------------------------------------------


def test_prometheus_rule_is_the_compose_alert_rules() -> None:
    chart_copy = CHART / "files" / "alerts.yml"
    assert chart_copy.read_bytes() == COMPOSE_ALERTS.read_bytes(), (
        f"cp {COMPOSE_ALERTS.relative_to(REPO)} {chart_copy.relative_to(REPO)}"
    )
    rule = one(render(None, "prometheusRule.enabled=true"), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(COMPOSE_ALERTS.read_text())["groups"]


def test_service_monitors_scrape_under_the_alert_rules_job_names() -> None:
    manifests = render("gpu-8")
    for component, job_name in (("worker", "rerank-worker"), ("gateway", "rerank-gateway")):
        monitor = one(manifests, "ServiceMonitor", component)
        service = one(manifests, "Service", component)
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert {"action": "replace", "targetLabel": "job", "replacement": job_name} in endpoint[
            "relabelings"
        ]
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = COMPOSE_ALERTS.read_text()
    assert 'job="rerank-worker"' in alerts


# --- KEDA -----------------------------------------------------------------------------------


def test_keda_scales_the_statefulset_on_the_group_lag() -> None:
    manifests = render("sasl-ssl")
    scaled = one(manifests, "ScaledObject")
    statefulset = worker(manifests)
    env = literal_env(statefulset)
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": statefulset["metadata"]["name"],
    }
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == env["RERANK_GROUP_ID"] == "rerank-workers"
    assert meta["topic"] == env["RERANK_REQUEST_TOPIC"] == "rerank.requests"
    assert meta["bootstrapServers"] == env["RERANK_BOOTSTRAP_SERVERS"]
    assert meta["lagThreshold"] == "1000"
    assert (meta["sasl"], meta["tls"]) == ("scram_sha512", "enable")
    assert meta["offsetResetPolicy"] == "earliest"  # the worker's auto_offset_reset
    # KEDA owns the count: a replicas field would undo its scaling at every upgrade.
    assert "replicas" not in statefulset["spec"]
    assert scaled["spec"]["maxReplicaCount"] <= int(
        literal_env(one(manifests, "Job", "topics"))["PARTITIONS"]
    )
    auth = one(manifests, "TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "username": ("kafka-rerank-sasl", "username"),
        "password": ("kafka-rerank-sasl", "password"),
        "ca": ("kafka-ca", "ca.crt"),
    }


def test_keda_without_kafka_security_needs_no_trigger_authentication() -> None:
    manifests = render(None, "keda.enabled=true")
    (trigger,) = one(manifests, "ScaledObject")["spec"]["triggers"]
    assert "authenticationRef" not in trigger and "sasl" not in trigger["metadata"]
    assert trigger["metadata"]["tls"] == "disable"
    assert "TriggerAuthentication" not in kinds(manifests)


def test_the_lag_threshold_is_five_seconds_of_one_measured_worker() -> None:
    # docs/benchmarks.md: one H200 through Kafka, 8 documents a request (the e2e run).
    run = json.loads(E2E_H200.read_text())
    (saturated,) = [p for p in run["phases"] if p["name"] == "saturated"]
    assert run["settings"]["docs"] == 8 and run["settings"]["config"] == "0.6b"
    records_in_5_s = saturated["pairs_per_s"] / run["settings"]["docs"] * 5
    threshold = int(yaml.safe_load((CHART / "values.yaml").read_text())["keda"]["lagThreshold"])
    assert abs(threshold - records_in_5_s) / records_in_5_s < 0.05
    # Above what one busy worker holds in flight by itself (uncommitted until answered).
    in_flight = Settings.model_fields["inflight_high_pairs"].default / 8
    assert threshold > 1.5 * in_flight


# --- wiring ---------------------------------------------------------------------------------


def test_the_test_command_fetches_helm_and_the_validator_is_a_dev_dependency() -> None:
    test_sh = (REPO / "scripts" / "test.sh").read_text()
    assert '"$ROOT/deploy/local/helm" fetch' in test_sh
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("kubernetes-validate") for req in dev["dev"])


def test_crd_schemas_say_where_they_come_from() -> None:
    readme = (CRD_DIR / "README.md").read_text()
    for name in CRD_FILES.values():
        assert name in readme
    assert "Apache" in readme and (CRD_DIR / "LICENSE.Apache-2.0").is_file()


def test_operations_doc_explains_the_chart() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    section = doc.split("\n## Kubernetes\n", 1)[1]
    headings = re.findall(r"^#+\s+(.+?)\s*$", doc, flags=re.M)
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}
    for link in re.findall(r"\]\(#([^)]+)\)", section):
        assert link in anchors, link
    for example in EXAMPLES:
        assert f"`{example}.yaml`" in section
    assert "lagThreshold" in section and "1,561 pairs/s" in section


def test_the_worker_container_has_a_read_only_root_filesystem() -> None:
    """As the gateway's: whatever the worker writes goes to its cache volume or /tmp."""
    worker = one(render("gpu-1"), "StatefulSet", "worker")
    assert container(worker)["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container(worker)["volumeMounts"]}
    assert mounts["/tmp"] == "tmp" and mounts["/var/cache/rerank"] == "cache"
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["tmp"]
