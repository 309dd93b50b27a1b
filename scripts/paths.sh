# Where set-up puts things; sourced by the scripts (which set ROOT, the checkout, first).
#   RERANK_CACHE_DIR  what every checkout may share: the Kafka broker's jars, the Maven
#                     repository, tools built from pinned sources  (default ~/.cache/kafka-rerank)
#   VENV              this checkout's own venv: the project is installed into it in editable
#                     mode, so its console scripts run this checkout's code and two clones
#                     never run each other's  (default $ROOT/.venv, git-ignored; RERANK_VENV
#                     overrides it)
export RERANK_CACHE_DIR="${RERANK_CACHE_DIR:-$HOME/.cache/kafka-rerank}"
VENV="${RERANK_VENV:-$ROOT/.venv}"
