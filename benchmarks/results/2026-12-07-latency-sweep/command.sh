#!/usr/bin/env bash
# The GPU call of issue 30 (one card): the 0.6B default path through Kafka, the code before
# (afb51ad, the workers run from .h30-base through --worker-root) and after (this branch,
# late cut), each with its own saturated phase, then a sweep of paced phases at 50% to 95%
# of that run's steady saturated rate in 5% steps, with the engine probe on. Run from .h30
# (this branch's files and the e2e bundle in .h30/.e2e); each run's folder goes back as
# its own archive.
set -u
R=/tmp/r; mkdir -p $R
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
nproc >> $R/gpu.txt; lscpu | grep "Model name" >> $R/gpu.txt; cat $R/gpu.txt
cp benchmarks/results/2026-12-07-latency-sweep/command.sh $R/ 2>/dev/null || true
P=(--phase-s 7 --warm-s 3 --concurrency 256 --engine-pairs 0 --lone 30 --kafka-port 39292
   --fraction-of steady --fractions 0.5 0.55 0.6 0.65 0.7 0.75 0.8 0.85 0.9 0.95 --engine-probe)
run() {  # name, timeout, then options
  local name=$1 t=$2; shift 2
  echo "$name starts at ${SECONDS}s"
  timeout $t bash benchmarks/e2e/run.sh --out $R/$name "${P[@]}" "$@" > $R/$name.log 2>&1
  echo "$name rc=$? at ${SECONDS}s"
  grep -E "ready after|^(saturated|lone|paced)" $R/$name.log | cut -c1-200
  cp $R/$name.log $R/$name/ 2>/dev/null
  tar -czf $OUT/$name.tgz -C $R $name
}
run before 175 --worker-root ../.h30-base
run after 175
cp $R/gpu.txt $OUT/
