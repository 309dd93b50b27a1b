#!/usr/bin/env bash
# Create the rerank topics, or add partitions to them. Idempotent: compose's `topics` job
# runs it on every `up`, and it works the same against an existing cluster with any Kafka
# distribution's tools (KAFKA_BIN).
#
# Environment:
#   BOOTSTRAP_SERVERS   required  host:port[,host:port...]
#   PARTITIONS          required  partitions of the request topic: at least the number of
#                                 workers (one partition feeds at most one worker of a group)
#   REPLY_PARTITIONS    default PARTITIONS (each SDK client reads one reply partition: more
#                       partitions, fewer foreign replies per client)
#   DLQ_PARTITIONS      default PARTITIONS
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
# A topic that has fewer partitions than asked gets more (Kafka cannot remove any; the
# request keys are correlation ids, so no ordering depends on the key-to-partition mapping).
set -euo pipefail

: "${BOOTSTRAP_SERVERS:?BOOTSTRAP_SERVERS is required}"
: "${PARTITIONS:?PARTITIONS is required}"
REPLICATION_FACTOR="${REPLICATION_FACTOR:-1}"
KAFKA_BIN="${KAFKA_BIN:-/opt/kafka/bin}"

REPLY_PARTITIONS="${REPLY_PARTITIONS:-$PARTITIONS}"
DLQ_PARTITIONS="${DLQ_PARTITIONS:-$PARTITIONS}"

for setting in PARTITIONS REPLY_PARTITIONS DLQ_PARTITIONS REPLICATION_FACTOR; do
    if ! [[ "${!setting}" =~ ^[1-9][0-9]*$ ]]; then
        echo "create-topics: $setting must be a positive integer, got '${!setting}'" >&2
        exit 2
    fi
done

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

# ensure_topic NAME PARTITIONS RETENTION_MS
ensure_topic() {
    local topic="$1" partitions="$2" retention_ms="$3" current
    topics_cmd --create --if-not-exists --topic "$topic" \
        --partitions "$partitions" --replication-factor "$REPLICATION_FACTOR" \
        --config "retention.ms=$retention_ms"
    current="$(partition_count "$topic")"
    if [[ -z "$current" ]]; then
        echo "create-topics: cannot read the partition count of $topic" >&2
        exit 1
    fi
    if (( current < partitions )); then
        echo "create-topics: $topic has $current partitions, adding up to $partitions"
        topics_cmd --alter --topic "$topic" --partitions "$partitions"
    elif (( current > partitions )); then
        echo "create-topics: $topic keeps its $current partitions (more than the $partitions asked)"
    fi
    echo "create-topics: $topic ready"
}

ensure_topic "${REQUEST_TOPIC:-rerank.requests}" "$PARTITIONS" "${REQUEST_RETENTION_MS:-86400000}"
ensure_topic "${REPLY_TOPIC:-rerank.replies}" "$REPLY_PARTITIONS" "${REPLY_RETENTION_MS:-86400000}"
ensure_topic "${DLQ_TOPIC:-rerank.requests.dlq}" "$DLQ_PARTITIONS" "${DLQ_RETENTION_MS:-1209600000}"
