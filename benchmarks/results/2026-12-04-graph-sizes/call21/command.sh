#!/usr/bin/env bash
# GPU call 21 (one H200, 16-core host). First the parity check, with a variant whose CUDA
# graphs take every batch (up to ~25k tokens). Then the 0.6B default path through Kafka,
# graphs up to 8,192 tokens (the default) against up to 16,384
# (--cuda-graph-max-tokens 16384), alternating, while time is left.
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
lscpu | grep "Model name" >> $R/gpu.txt
cp .e2e/call21.sh $R/command.sh
bash benchmarks/e2e/run.sh --help > /dev/null  # installs the wheels once
TOK=/tmp/tokenizer
echo "tokenizer: $TOK"
echo "check starts at ${SECONDS}s"
PYTHONPATH=$PWD:/tmp/rerank-e2e/site timeout 150 python3 -m benchmarks.gpu_check $TOK > $R/check.txt 2> $R/check.err
echo "check rc=$? at ${SECONDS}s"; grep -E "variant|ok\"|vs reference_fp32" $R/check.txt
run() {  # name, timeout, then options
  local name=$1 t=$2; shift 2
  (( SECONDS + t < 590 )) || { echo "no time left for $name"; return; }
  echo "$name starts at ${SECONDS}s"
  timeout $t bash benchmarks/e2e/run.sh --out $R/$name "$@" > $R/$name.log 2>&1
  echo "$name rc=$? at ${SECONDS}s"; grep -E "ready after|^(saturated|lone|paced|engine)|steady" $R/$name.log 2>/dev/null | tail -8
  grep -h "captured CUDA graphs" $R/$name/*.log 2>/dev/null | head -2
}
P="--phase-s 10 --warm-s 4 --concurrency 256 --engine-pairs 0 --fractions --lone 100 --rates 102 163 183"
G=(--worker-args "--cuda-graph-max-tokens 16384")
run g8k-a 140 $P
run g16k-a 140 $P "${G[@]}"
run g8k-b 140 $P
run g16k-b 140 $P "${G[@]}"
cd $OUT && tar -czf r.tgz r && rm -rf r
