#!/usr/bin/env bash
# Sets up everything the demo and the tests need, reusing what is already there:
#   - a Python venv outside the repo (torch from PyPI is a multi-GB CUDA build: keep it),
#   - the project and its Python dependencies (pip's cache is kept between runs),
#   - the Kafka broker's jars (fetched once with Maven by deploy/local/kafka).
# Safe to run again and again; a warm run takes a few seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export RERANK_CACHE_DIR="${RERANK_CACHE_DIR:-$HOME/.cache/kafka-rerank}"
VENV="${RERANK_VENV:-$RERANK_CACHE_DIR/venv}"
PYTHON_BIN="${PYTHON:-python3}"

say() { echo "[setup] $*"; }

if ! "$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "[setup] error: Python 3.11 or newer is needed as '$PYTHON_BIN' (set PYTHON=...)" >&2
    exit 1
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating venv $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi

# The project is installed in editable mode so console scripts point at this checkout;
# dependencies already present are left alone, so a warm run needs no downloads.
say "installing the project and its dependencies into $VENV"
"$VENV/bin/python" -m pip install -q --no-build-isolation -e "$ROOT[dev,demo]"

say "fetching the Kafka broker (cached after the first time)"
"$ROOT/deploy/local/kafka" fetch

say "ready: venv $VENV"
