#!/usr/bin/env bash
# The end-to-end GPU benchmark, one command on the GPU host (from the repository root):
#   bash benchmarks/e2e/run.sh --out results/ [--gpus N] [--config 0.6b] ...
# .e2e/ must be there (bash benchmarks/e2e/pack.sh, run where there is a network). The
# wheels go into a scratch site folder, never into the host's Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUNDLE="${E2E_BUNDLE:-$ROOT/.e2e}"
SITE="${E2E_SITE:-/tmp/rerank-e2e/site}"
PY="${PYTHON:-python3}"
[[ -f $BUNDLE/jre.tar.xz ]] || { echo "no bundle at $BUNDLE: run benchmarks/e2e/pack.sh first" >&2; exit 2; }
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# With $SITE on the path: a second run finds the first run's wheels and installs nothing
# (reinstalling cost every run seconds, and two runs side by side raced on the folder).
if ! "$PY" -c 'import aiokafka, orjson, pydantic_settings, opentelemetry.trace, tiktoken' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$BUNDLE"/wheels/*.whl
fi
cd "$ROOT"
exec "$PY" -m benchmarks.e2e_bench --bundle "$BUNDLE" "$@"
