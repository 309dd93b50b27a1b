"""``pip install kafka-rerank`` as a producer service does it: the SDK alone.

The wheel is built from this checkout and installed without extras into a clean venv,
with every dependency held at the lowest version ``pyproject.toml`` allows, so the lower
bounds are tested, not guessed. The installed ``rerank-client`` then ranks through a real
broker and a real worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.version import Version
from worker_harness import FakeEngine, TopicFactory, make_topics, running_worker, worker_config

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
GPU_STACK = {"torch", "transformers", "triton", "tokenizers", "prometheus-client", "aiohttp"}
PIP_TIMEOUT_S = 400


def lowest_versions() -> dict[str, str]:
    """``name -> version`` for every ``name>=version`` in the package's dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lowest = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", requirement)
        assert match, f"{requirement!r}: every SDK dependency needs a plain lower bound"
        lowest[match.group(1).lower()] = match.group(2)
    return lowest


def run(*args: str | Path, timeout: float = PIP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed, no extras, dependencies at their lower bounds."""
    root = tmp_path_factory.mktemp("sdk-install")
    built = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "-w", root / "dist", REPO,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("kafka_rerank-*.whl")
    venv = root / "venv"
    created = run(sys.executable, "-m", "venv", venv)
    assert created.returncode == 0, created.stderr
    constraints = root / "lowest.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in lowest_versions().items()))
    installed = run(
        venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
        "-c", constraints, wheel,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    return venv


def installed_versions(venv: Path) -> dict[str, str]:
    listed = run(venv / "bin" / "python", "-m", "pip", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)}


def test_the_sdk_installs_alone_at_its_lowest_versions(sdk_venv: Path) -> None:
    versions = installed_versions(sdk_venv)
    assert not GPU_STACK & set(versions), sorted(GPU_STACK & set(versions))
    assert not [name for name in versions if name.startswith("nvidia-")]
    for name, lowest in lowest_versions().items():
        assert Version(versions[name]) == Version(lowest), (name, versions[name])
    imported = run(
        sdk_venv / "bin" / "python", "-c",
        "import producer_sdk, schemas; print(producer_sdk.RerankClient.__name__)",
    )  # fmt: skip
    assert (imported.returncode, imported.stdout.strip()) == (0, "RerankClient"), imported.stderr
    helped = run(sdk_venv / "bin" / "rerank-client", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: rerank-client")


def test_the_worker_says_which_extra_it_needs(sdk_venv: Path) -> None:
    started = run(sdk_venv / "bin" / "rerank-consumer")
    assert started.returncode == 2
    assert "pip install 'kafka-rerank[worker]'" in started.stderr
    assert "missing: torch" in started.stderr


def test_the_gateway_says_which_extra_it_needs(sdk_venv: Path) -> None:
    started = run(sdk_venv / "bin" / "rerank-gateway")
    assert started.returncode == 2
    assert "pip install 'kafka-rerank[gateway]'" in started.stderr
    assert "missing: aiohttp" in started.stderr


async def test_the_installed_cli_ranks_through_a_real_broker_and_worker(
    sdk_venv: Path,
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    new_group: Callable[[], str],
) -> None:
    topics = await make_topics(new_topic)
    config = worker_config(kafka_bootstrap, topics, new_group())
    async with running_worker(config, FakeEngine()):
        client = await asyncio.create_subprocess_exec(
            str(sdk_venv / "bin" / "rerank-client"),
            "--bootstrap-servers", kafka_bootstrap,
            "--request-topic", topics.requests,
            "--reply-topic", topics.replies,
            "--json",
            "what is kafka?", "a distributed log", "a novelist",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": ""},
        )  # fmt: skip
        out, err = await asyncio.wait_for(client.communicate(), 60)
    assert client.returncode == 0, err.decode()
    reply = json.loads(out)
    assert sorted(r["index"] for r in reply["results"]) == [0, 1]
