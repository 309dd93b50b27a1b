"""``python -m consumer`` and the ``rerank-consumer`` console script: run one worker."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

# What the worker needs beyond the SDK: the ``worker`` extra of the package.
WORKER_PACKAGES = ("torch", "transformers", "prometheus_client", "pydantic_settings", "aiohttp")
EXIT_BAD_SETTINGS = 2


def missing_worker_packages() -> list[str]:
    """The worker's packages that are not installed (found without importing them)."""
    return [name for name in WORKER_PACKAGES if importlib.util.find_spec(name) is None]


def main() -> None:
    """Run the worker with the process's flags and environment; exits with its code."""
    missing = missing_worker_packages()
    if missing:
        print(
            "rerank-consumer: the worker needs its GPU stack, which a plain "
            "`pip install kafka-rerank` (the SDK) leaves out: "
            f"pip install 'kafka-rerank[worker]' (missing: {', '.join(missing)})",
            file=sys.stderr,
        )
        sys.exit(EXIT_BAD_SETTINGS)
    from consumer.app import main as run

    code = run(sys.argv[1:])
    # Everything the worker owns is closed and flushed by now (its last log line says
    # how it stopped). The interpreter's teardown would only add native extensions'
    # complaints: triton's nanobind module prints some 30 "nanobind: leaked ..." lines
    # after every clean exit. So the process ends here, without it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
