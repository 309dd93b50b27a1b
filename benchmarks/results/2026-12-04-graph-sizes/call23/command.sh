#!/usr/bin/env bash
# GPU call 23 (one H200, 16-core host). The 4B shape through Kafka, saturated: the in-flight
# window at 2.5 s against the fixed marks (the default), now that records are let in oldest
# first. Then, while time is left, the 0.6B graphs comparison of call 22 again (6 cores).
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
cp .e2e/call23.sh $R/command.sh
bash benchmarks/e2e/run.sh --help > /dev/null  # installs the wheels once
run() {  # name, timeout, then options
  local name=$1 t=$2; shift 2
  (( SECONDS + t < 560 )) || { echo "no time left for $name"; return; }
  echo "$name starts at ${SECONDS}s"
  timeout $t "$@" --out $R/$name > $R/$name.log 2>&1
  echo "$name rc=$? at ${SECONDS}s"; grep -E "^(saturated|lone|paced|engine)|steady" $R/$name/summary.txt 2>/dev/null || tail -5 $R/$name.log
  grep -h "ready after" $R/$name.log
}
W="bash benchmarks/e2e/run.sh --config 4b --phase-s 15 --warm-s 5 --concurrency 256 --engine-pairs 0 --fractions --lone 20"
run window 200 $W --worker-args "--inflight-target-s 2.5"
run fixed 200 $W
P="taskset -c 0-5 bash benchmarks/e2e/run.sh --phase-s 10 --warm-s 4 --concurrency 256 --engine-pairs 0 --fractions --lone 50 --rates 163 183"
run g16k-c 130 $P --worker-args "--cuda-graph-max-tokens 16384"
run g8k-c 130 $P
cd $OUT && tar -czf r.tgz r && rm -rf r
