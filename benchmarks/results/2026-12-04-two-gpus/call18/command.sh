#!/usr/bin/env bash
# GPU call 18 (evening, 2 x H200 host): two workers (one per GPU) against one, saturated
# through one broker, same call; --concurrency is requests in flight per GPU
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
cp .e2e/call18.sh $R/command.sh
E="--phase-s 15 --warm-s 5 --fractions --lone 20"
run() {  # name, then options
  local name=$1; shift
  timeout 130 bash benchmarks/e2e/run.sh --out $R/$name $E "$@" > $R/$name.log 2>&1
  echo "$name rc=$?"; grep -E "^(hardware|saturated|lone|engine)" $R/$name/summary.txt 2>/dev/null || tail -3 $R/$name.log
}
run g2-c256 --gpus 2 --concurrency 256 --engine-pairs 0
run g1-c256 --gpus 1 --concurrency 256 --engine-pairs 0
run g1-c512 --gpus 1 --concurrency 512 --engine-pairs 0
run g2-c512 --gpus 2 --concurrency 512 --engine-pairs 0
run g1-c256b --gpus 1 --concurrency 256
cd $OUT && tar -czf r.tgz r && rm -rf r
