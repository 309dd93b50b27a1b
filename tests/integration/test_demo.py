"""The demo as a user runs it: ``scripts/demo.py`` against the test broker.

It starts a real worker process (``python -m consumer``) with whichever model the demo
picks here (Qwen3-Reranker-0.6B when it can be loaded, else the all-MiniLM-L6-v2
bi-encoder) and ranks its queries through the SDK. Its topics and group get uuid names,
so it cannot meet a worker of anyone else on a shared broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest
from aiokafka.admin import AIOKafkaAdminClient

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.py"
# A cold start imports torch and loads a model on a busy 2-core box: generous bounds.
READY_TIMEOUT_S = 240
DEMO_TIMEOUT_S = 330
FIRST_ROW = re.compile(r"^\s*1\s+\S+\s+(\d+)\s")


def load_demo() -> ModuleType:
    """The demo script as a module, for its queries (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("rerank_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def best_index_after(output: list[str], query_line: str) -> int:
    """The index column of rank 1 in the table printed after ``query_line``."""
    start = output.index(query_line)
    for line in output[start + 1 :]:
        match = FIRST_ROW.match(line)
        if match:
            return int(match.group(1))
    raise AssertionError(f"no ranking printed after {query_line!r}")


@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
async def test_demo_ranks_its_queries_with_a_real_worker(
    kafka_bootstrap: str, kafka_admin: AIOKafkaAdminClient
) -> None:
    name = f"test-{uuid.uuid4().hex}"
    topics = [f"{name}.requests", f"{name}.replies", f"{name}.dlq"]
    command = [
        sys.executable,
        str(DEMO),
        "--bootstrap-servers", kafka_bootstrap,
        "--request-topic", topics[0],
        "--reply-topic", topics[1],
        "--dlq-topic", topics[2],
        "--group-id", f"{name}-group",
        "--ready-timeout", str(READY_TIMEOUT_S),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT_S,
            check=False,
        )
    finally:
        # Best effort: the demo may have failed before it created them.
        with contextlib.suppress(Exception):
            await kafka_admin.delete_topics(topics)

    assert done.returncode == 0, f"demo failed:\n{done.stdout}\n{done.stderr}"
    output = done.stdout.splitlines()
    assert any(line.startswith("ranked by ") for line in output), done.stdout
    english = [q for q in load_demo().QUERIES if q.language == "en"]
    assert english
    for query in english:
        assert best_index_after(output, f"[en] {query.text}") == query.relevant, done.stdout
    assert "worker stopped cleanly (exit 0)" in output[-1]
    # The first English query again, over HTTP through rerank-gateway (Cohere's API).
    assert any(line.strip().startswith("curl -s http://127.0.0.1:") for line in output)
    gateway = [line for line in output if line.startswith("gateway: best document index")]
    assert len(gateway) == 1, done.stdout
    assert gateway[0].startswith(f"gateway: best document index {english[0].relevant} ")
    assert gateway[0].endswith("the expected one")
