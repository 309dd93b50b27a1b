#!/usr/bin/env bash
# Create the rerank topics, or add partitions to them. Idempotent: compose's `topics` job
# runs it on every `up`, and it works the same against an existing cluster with any Kafka
# distribution's tools (KAFKA_BIN).
#
# Environment:
#   BOOTSTRAP_SERVERS   required  host:port[,host:port...]
#   PARTITIONS          required  partitions of each topic; at least the number of workers
#   REPLICATION_FACTOR  default 1 (3 on a real cluster)
#   REQUEST_TOPIC       default rerank.requests
#   REPLY_TOPIC         default rerank.replies
#   DLQ_TOPIC           default rerank.requests.dlq
#   REQUEST_RETENTION_MS  default 86400000 (1 day: a request older than that is stale)
#   REPLY_RETENTION_MS    default 86400000
#   DLQ_RETENTION_MS      default 1209600000 (14 days: time to look at what failed)
#   COMMAND_CONFIG      optional client properties file (SASL/SSL), passed as --command-config
#   KAFKA_BIN           default /opt/kafka/bin
#
# A topic that has fewer partitions than PARTITIONS gets more (Kafka cannot remove any; the
# request keys are correlation ids, so no ordering depends on the key-to-partition mapping).
set -euo pipefail

: "${BOOTSTRAP_SERVERS:?BOOTSTRAP_SERVERS is required}"
: "${PARTITIONS:?PARTITIONS is required}"
REPLICATION_FACTOR="${REPLICATION_FACTOR:-1}"
KAFKA_BIN="${KAFKA_BIN:-/opt/kafka/bin}"

if ! [[ "$PARTITIONS" =~ ^[1-9][0-9]*$ ]]; then
    echo "create-topics: PARTITIONS must be a positive integer, got '$PARTITIONS'" >&2
    exit 2
fi
if ! [[ "$REPLICATION_FACTOR" =~ ^[1-9][0-9]*$ ]]; then
    echo "create-topics: REPLICATION_FACTOR must be a positive integer, got '$REPLICATION_FACTOR'" >&2
    exit 2
fi

topics_cmd() {
    local extra=()
    if [[ -n "${COMMAND_CONFIG:-}" ]]; then
        extra=(--command-config "$COMMAND_CONFIG")
    fi
    "$KAFKA_BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP_SERVERS" "${extra[@]}" "$@"
}

partition_count() {
    topics_cmd --describe --topic "$1" | sed -n 's/.*PartitionCount: *\([0-9][0-9]*\).*/\1/p' | head -n 1
}

# ensure_topic NAME RETENTION_MS
ensure_topic() {
    local topic="$1" retention_ms="$2" current
    topics_cmd --create --if-not-exists --topic "$topic" \
        --partitions "$PARTITIONS" --replication-factor "$REPLICATION_FACTOR" \
        --config "retention.ms=$retention_ms"
    current="$(partition_count "$topic")"
    if [[ -z "$current" ]]; then
        echo "create-topics: cannot read the partition count of $topic" >&2
        exit 1
    fi
    if (( current < PARTITIONS )); then
        echo "create-topics: $topic has $current partitions, adding up to $PARTITIONS"
        topics_cmd --alter --topic "$topic" --partitions "$PARTITIONS"
    elif (( current > PARTITIONS )); then
        echo "create-topics: $topic keeps its $current partitions (more than PARTITIONS=$PARTITIONS)"
    fi
    echo "create-topics: $topic ready"
}

ensure_topic "${REQUEST_TOPIC:-rerank.requests}" "${REQUEST_RETENTION_MS:-86400000}"
ensure_topic "${REPLY_TOPIC:-rerank.replies}" "${REPLY_RETENTION_MS:-86400000}"
ensure_topic "${DLQ_TOPIC:-rerank.requests.dlq}" "${DLQ_RETENTION_MS:-1209600000}"
