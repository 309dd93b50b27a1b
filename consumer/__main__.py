"""``python -m consumer`` and the ``rerank-consumer`` console script: run one worker."""

from __future__ import annotations

import sys


def main() -> None:
    """Run the worker with the process's flags and environment; exits with its code."""
    from consumer.app import main as run

    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
