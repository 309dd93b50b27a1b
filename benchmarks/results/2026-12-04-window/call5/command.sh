#!/usr/bin/env bash
# GPU call 5 (afternoon): the 4B shape through Kafka, the in-flight window following the
# measured rate (defaults) against the fixed marks (--inflight-target-s 0), same call
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
cp .e2e/call16.sh $R/command.sh
E="--config 4b --phase-s 15 --warm-s 5 --concurrency 256 --engine-pairs 0 --lone 20"
for side in window fixed; do
  extra=(); [[ $side == fixed ]] && extra=(--worker-args "--inflight-target-s 0")
  timeout 250 bash benchmarks/e2e/run.sh --out $R/e2e-$side $E "${extra[@]}" > $R/e2e-$side.log 2>&1
  echo "e2e $side rc=$?"; grep -E "^(saturated|lone|paced)" $R/e2e-$side/summary.txt 2>/dev/null || tail -5 $R/e2e-$side.log
  grep -o "in_flight[^,]*" $R/e2e-$side/worker-gpu0.log 2>/dev/null | tail -2
done
cd $OUT && tar -czf r.tgz r && rm -rf r
