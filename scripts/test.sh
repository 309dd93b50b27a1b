#!/usr/bin/env bash
# The test command: set-up, lint, types, unit tests, then integration tests against a
# real Kafka broker that this script starts (and always stops).
# Fails when any check fails or when no integration test ran.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source "$ROOT/scripts/paths.sh"
PY="$VENV/bin/python"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# The chaos tests' fault injector (built once with Go, cached like the Kafka jars).
"$ROOT/deploy/local/toxiproxy" fetch
export RERANK_TOXIPROXY="$("$ROOT/deploy/local/toxiproxy" path)"
"$ROOT/deploy/local/helm" fetch
# The Spring Kafka caller of tests/integration/test_kafka_callers.py (built once, cached),
# and kcat for the same tests (yours on PATH, else Debian's, unpacked once into the cache).
bash "$ROOT/tests/spring/build.sh" >/dev/null
"$ROOT/deploy/local/kcat" fetch

echo "[test] ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "[test] mypy"
"$VENV/bin/mypy"

echo "[test] unit tests"
"$PY" -m pytest -m "not integration" -q -p no:cacheprovider

started_broker=""
stop_broker() {
    if [[ -n "$started_broker" ]]; then
        KAFKA_PORT="$started_broker" "$ROOT/deploy/local/kafka" stop || true
    fi
}
trap stop_broker EXIT
if [[ -z "${KAFKA_BOOTSTRAP:-}" ]]; then
    port="${RERANK_TEST_KAFKA_PORT:-29092}"
    echo "[test] starting Kafka on 127.0.0.1:$port (fresh data)"
    KAFKA_PORT="$port" "$ROOT/deploy/local/kafka" stop >/dev/null
    KAFKA_PORT="$port" "$ROOT/deploy/local/kafka" wipe
    KAFKA_PORT="$port" "$ROOT/deploy/local/kafka" start
    started_broker="$port"
    export KAFKA_BOOTSTRAP="127.0.0.1:$port"
fi

echo "[test] integration tests against $KAFKA_BOOTSTRAP"
# pytest exits 5 when it collected nothing: that is a failure here too.
"$PY" -m pytest -m integration -q -p no:cacheprovider
