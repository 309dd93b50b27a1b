"""Fixtures of the chaos suite: Toxiproxy and a broker of the suite's own behind it.

The suite's broker is started once per module and restarted by some scenarios; the
session's shared broker is never touched.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos_tools import REPO, ChaosBroker, Toxiproxy


@pytest.fixture(scope="session")
def toxiproxy_binary() -> str:
    """toxiproxy-server, built by ``deploy/local/toxiproxy fetch`` (scripts/test.sh)."""
    configured = os.environ.get("RERANK_TOXIPROXY")
    if configured:
        return configured
    found = subprocess.run(
        [str(REPO / "deploy" / "local" / "toxiproxy"), "path"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        pytest.fail("toxiproxy-server is missing: run deploy/local/toxiproxy fetch", pytrace=False)
    return found.stdout.strip()


@pytest.fixture(scope="module")
def chaos_broker(
    tmp_path_factory: pytest.TempPathFactory, toxiproxy_binary: str
) -> Iterator[ChaosBroker]:
    toxiproxy = Toxiproxy(toxiproxy_binary)
    broker = ChaosBroker(tmp_path_factory.mktemp("chaos-broker") / "state", toxiproxy)
    try:
        broker.start()
        yield broker
    finally:
        with contextlib.suppress(OSError, ValueError):  # not paused, or never started
            broker.resume()
        subprocess.run(
            [str(REPO / "deploy" / "local" / "kafka"), "stop"],
            env=broker.env,
            capture_output=True,
            check=False,
            timeout=120,
        )
        toxiproxy.stop()


@pytest.fixture
def worker_logs(tmp_path: Path) -> Path:
    return tmp_path
