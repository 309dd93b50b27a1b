#!/usr/bin/env bash
# The service on this machine until Ctrl-C: set up, start a local Kafka broker (unless
# KAFKA_BOOTSTRAP names one, or one answers on KAFKA_PORT already), create the topics,
# start one worker and rerank-gateway on port 8000, print the URLs and the calls to try.
# Ctrl-C stops the gateway, the worker and the broker this started.
# Arguments go to scripts/serve.py (--model, --gateway-port, ...; --help lists them).
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
        echo "stopping the Kafka broker on 127.0.0.1:$port"
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

# A stop signal for this shell (Ctrl-C's SIGINT, a SIGTERM) goes on to serve.py, which
# stops the gateway and the worker; this shell waits for that, then its EXIT trap stops
# the broker.
"$VENV/bin/python" scripts/serve.py --bootstrap-servers "$KAFKA_BOOTSTRAP" "$@" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' INT TERM
status=0
wait "$server" || status=$?
# A stop signal cuts a wait short (each one: Ctrl-C and a supervisor's SIGTERM may both
# come): wait again until serve.py has stopped the gateway and the worker.
while kill -0 "$server" 2>/dev/null; do
    status=0
    wait "$server" || status=$?
done
exit "$status"
