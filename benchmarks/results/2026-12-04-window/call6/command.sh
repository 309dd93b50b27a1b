#!/usr/bin/env bash
# GPU call 6 (afternoon): 0.6B defaults through Kafka, the fair poll (new) against commit
# 6a627c3 (prev, .e2e/prev: the hand-overs, plain poll); results written as they come
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
cp .e2e/call17.sh $R/command.sh
E="--phase-s 10 --warm-s 4 --concurrency 256 --engine-pairs 0 --fractions --lone 100 --rates 163"
for side in new prev; do
  S=benchmarks/e2e/run.sh; [[ $side == prev ]] && S=.e2e/prev/benchmarks/e2e/run.sh
  E2E_BUNDLE=$PWD/.e2e timeout 105 bash $S --out $R/e2e-$side $E > $R/e2e-$side.log 2>&1
  echo "e2e $side rc=$?"; grep -E "^(saturated|lone|paced)" $R/e2e-$side/summary.txt 2>/dev/null || tail -3 $R/e2e-$side.log
done
