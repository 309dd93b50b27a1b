"""The ``rerank-gateway`` binary against clients that send slowly, or stall.

No broker is needed: what slow clients hold happens before a call reaches Kafka (the
gateway starts without one and reads bodies first). An outside review found: half a
request line held a connection 70 s, a body at one byte per 10 s held one 70 s, and 300
stalled 1 MB uploads took the gateway from 53 to 415 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = Path(sys.executable).with_name("rerank-gateway")
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if "VmRSS" in line) * 1024


@contextlib.asynccontextmanager
async def gateway(
    tmp_path: Path, *flags: str
) -> AsyncIterator[tuple[int, subprocess.Popen[bytes]]]:
    """The gateway binary with no broker to reach; yields its port once it is live."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env["PYTHONPATH"] = str(ROOT)
    args = [str(GATEWAY), "--bootstrap-servers", f"127.0.0.1:{free_port()}"]
    args += ["--port", str(port), "--host", "127.0.0.1", "--check-workers", "0", *flags]
    with (tmp_path / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=log)
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/health/live") as live:
                        if live.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield port, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 40)


def post_head(length: int) -> bytes:
    return (
        f"POST /v2/rerank HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bool, bytes]:
    """(whether the gateway closed the connection within ``seconds``, what it sent)."""
    received = b""
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(4096):
                received += chunk
    except TimeoutError:
        return False, received
    return True, received


async def test_half_a_request_line_is_cut_off_at_the_header_deadline(tmp_path: Path) -> None:
    async with gateway(tmp_path, "--header-timeout", "1") as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v2/rer")
        await writer.drain()
        started = time.monotonic()
        closed, _ = await closed_within(reader, 10)
        writer.close()
    assert closed and time.monotonic() - started < 5


async def test_a_body_that_trickles_in_is_answered_408_at_its_deadline(tmp_path: Path) -> None:
    async with gateway(tmp_path, "--body-timeout", "1") as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post_head(1000) + b"{")
        await writer.drain()
        started = time.monotonic()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        answered_after = time.monotonic() - started
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    assert answered_after < 5


async def test_connections_past_the_limit_are_closed_as_they_open(tmp_path: Path) -> None:
    async with gateway(tmp_path, "--max-connections", "5") as (port, _):
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
        closed = [(await closed_within(reader, 1.0))[0] for reader, _ in streams]
        for _, writer in streams:
            writer.close()
    assert closed.count(True) == 3 and closed[:5] == [False] * 5


async def stalled_uploads(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` uploads of 1 MB that send all but their last byte, then stall."""
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post_head(MIB) + b"x" * (MIB - 1))
        writers.append(writer)
    await asyncio.gather(*(w.drain() for w in writers), return_exceptions=True)
    return writers


async def test_stalled_uploads_hold_bounded_memory(tmp_path: Path) -> None:
    """Bodies are read within a byte budget (64 MiB by default); a call whose body does not
    fit is answered 429 unread, its connection closed. (Before: +322 MiB.)"""
    async with gateway(tmp_path, "--body-timeout", "60") as (port, proc):
        before = rss_bytes(proc.pid)
        writers = await stalled_uploads(port, 300)
        await asyncio.sleep(3.0)
        grown = rss_bytes(proc.pid) - before
        for writer in writers:
            writer.close()
    print(f"300 stalled 1 MB uploads: gateway RSS {before / MIB:.0f} MiB + {grown / MIB:.0f} MiB")
    assert grown < 128 * MIB, f"{grown / MIB:.0f} MiB"
