#!/usr/bin/env bash
# The main job: set up, start a local Kafka broker and one rerank worker, send a few
# real-looking queries through the SDK, print the rankings, stop what was started.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source "$ROOT/scripts/paths.sh"
export TOKENIZERS_PARALLELISM=false

port="${KAFKA_PORT:-9092}"
started_broker=""
stop_broker() {
    if [[ -n "$started_broker" ]]; then
        KAFKA_PORT="$port" "$ROOT/deploy/local/kafka" stop || true
    fi
}
trap stop_broker EXIT
if [[ -z "${KAFKA_BOOTSTRAP:-}" ]]; then
    status=0
    KAFKA_PORT="$port" "$ROOT/deploy/local/kafka" status >/dev/null 2>&1 || status=$?
    # 0: our broker runs there; 5: some other broker answers there: use it either way
    if [[ $status -ne 0 && $status -ne 5 ]]; then
        KAFKA_PORT="$port" "$ROOT/deploy/local/kafka" start
        started_broker="yes"
    fi
    export KAFKA_BOOTSTRAP="127.0.0.1:$port"
fi

"$VENV/bin/python" scripts/demo.py --bootstrap-servers "$KAFKA_BOOTSTRAP" "$@"
