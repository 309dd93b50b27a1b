#!/usr/bin/env bash
# GPU call 22 (one H200, 16-core host). The whole run (broker, worker, load generator) on 6
# of the host's cores (taskset -c 0-5), to bring on the congested regime that 32-core hosts
# showed: the 0.6B default path, graphs up to 8,192 tokens (the default) against up to
# 16,384, alternating.
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
lscpu | grep "Model name" >> $R/gpu.txt
cp .e2e/call22.sh $R/command.sh
bash benchmarks/e2e/run.sh --help > /dev/null  # installs the wheels once
command -v taskset || { echo "no taskset"; }
run() {  # name, timeout, then options
  local name=$1 t=$2; shift 2
  (( SECONDS + t < 590 )) || { echo "no time left for $name"; return; }
  echo "$name starts at ${SECONDS}s"
  timeout $t taskset -c 0-5 bash benchmarks/e2e/run.sh --out $R/$name "$@" > $R/$name.log 2>&1
  echo "$name rc=$? at ${SECONDS}s"; grep -E "ready after|^(saturated|lone|paced|engine)|steady" $R/$name/summary.txt 2>/dev/null || tail -5 $R/$name.log
  grep -h "captured CUDA graphs" $R/$name/*.log 2>/dev/null | head -2
}
P="--phase-s 10 --warm-s 4 --concurrency 256 --engine-pairs 0 --fractions --lone 50 --rates 163 183"
G=(--worker-args "--cuda-graph-max-tokens 16384")
run g8k-a 135 $P
run g16k-a 135 $P "${G[@]}"
run g8k-b 135 $P
run g16k-b 135 $P "${G[@]}"
cd $OUT && tar -czf r.tgz r && rm -rf r
