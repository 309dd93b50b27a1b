"""``rerank-gateway``: serve HTTP rerank APIs (Cohere, TEI, the wire contract) through Kafka.

::

    RERANK_BOOTSTRAP_SERVERS=kafka:9092 rerank-gateway            # port 8000
    curl -s localhost:8000/v2/rerank -H 'content-type: application/json' \\
        -d '{"model": "m", "query": "what is kafka?", "documents": ["a log", "a novelist"]}'

SIGTERM or SIGINT: stop taking calls, let those in flight finish, then exit 0.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

# What the gateway needs beyond the SDK: the ``gateway`` extra of the package.
GATEWAY_PACKAGES = ("aiohttp", "prometheus_client")
EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rerank-gateway`` console script; returns the exit status."""
    missing = [name for name in GATEWAY_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            "rerank-gateway needs an HTTP server, which a plain `pip install kafka-rerank` "
            f"leaves out: pip install 'kafka-rerank[gateway]' (missing: {', '.join(missing)})",
            file=sys.stderr,
        )
        return EXIT_BAD_SETTINGS
    import asyncio
    import logging

    from gateway.server import run
    from gateway.settings import parse_settings

    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.root.level))
    try:
        asyncio.run(run(settings))
    except OSError as error:  # the port is taken, say, before anything was served
        logging.getLogger("gateway").error("rerank-gateway could not start: %s", error)
        return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
