#!/usr/bin/env bash
# GPU call 19 (evening, 2 x H200 host). First two workers (one per GPU) against one,
# alternating, saturated. Then side by side: GPU 0 the 0.6B default path, this commit
# (oldest first) against 02ec0be (the backlog poll, .e2e/prev); GPU 1 the 4B shape with the
# in-flight window at 2.5 s against the fixed marks (the default). Each side has its own broker.
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
cp .e2e/call19.sh $R/command.sh
run() {  # name, timeout, then options
  local name=$1 t=$2; shift 2
  timeout $t bash benchmarks/e2e/run.sh --out $R/$name "$@" > $R/$name.log 2>&1
  echo "$name rc=$?"; grep -E "^(hardware|saturated|lone|paced|engine)" $R/$name/summary.txt 2>/dev/null || tail -3 $R/$name.log
}
S="--phase-s 15 --warm-s 5 --fractions --lone 20 --concurrency 256 --engine-pairs 0"
run g2-a 100 --gpus 2 $S
run g1-a 100 --gpus 1 $S
run g2-b 100 --gpus 2 $S
run g1-b 100 --gpus 1 $S
P="--gpus 1 --first-gpu 0 --work /tmp/w0 --kafka-port 39092 --phase-s 10 --warm-s 4 --concurrency 256 --engine-pairs 0 --fractions --lone 100 --rates 163 183"
W="--gpus 1 --first-gpu 1 --work /tmp/w1 --kafka-port 39093 --config 4b --phase-s 15 --warm-s 5 --concurrency 256 --engine-pairs 0 --fractions --lone 20"
( run new 110 $P; run prev 110 $P --worker-root .e2e/prev ) > $R/gpu0.txt 2>&1 &
( run window 160 $W --worker-args "--inflight-target-s 2.5"; run fixed 160 $W ) > $R/gpu1.txt 2>&1 &
wait; cat $R/gpu0.txt $R/gpu1.txt
cd $OUT && tar -czf r.tgz r && rm -rf r
