"""A worker process with a fake engine, for tests that kill it: ``python worker_proc.py ...``.

It prints ``ready`` on stdout once it is in its group, and stops cleanly on SIGTERM.
``WORKER_PROC_LOG=DEBUG`` in its environment sets its log level (default INFO).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from worker_harness import FakeEngine, Topics, fresh_metrics, wait_until, worker_config

from consumer.service.worker import Worker


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--replies", required=True)
    parser.add_argument("--dlq", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--high", type=int, default=4096)
    parser.add_argument("--low", type=int, default=2048)
    parser.add_argument("--instance-id", default=None, help="static group membership id")
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--delivery", default="at_least_once")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    topics = Topics(requests=args.requests, replies=args.replies, dlq=args.dlq)
    config = worker_config(
        args.bootstrap,
        topics,
        args.group,
        inflight_high_pairs=args.high,
        inflight_low_pairs=args.low,
        group_instance_id=args.instance_id,
        max_record_attempts=args.max_attempts,
        delivery=args.delivery,
    )
    worker = Worker(config, FakeEngine(delay_s=args.delay_s, blocking=True), fresh_metrics())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.request_stop)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: worker.in_group or task.done(), 30, "group join")
    print("ready", flush=True)
    await task


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("WORKER_PROC_LOG", "INFO"), stream=sys.stderr)
    asyncio.run(_main(_parse(sys.argv[1:])))
