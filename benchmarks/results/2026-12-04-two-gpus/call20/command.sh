#!/usr/bin/env bash
# GPU call 20 (evening, 2 x H200 host). Side by side, each with its own broker: GPU 0 the
# 0.6B default path, this commit (oldest first) against 02ec0be (the backlog poll,
# .e2e/prev); GPU 1 the 4B shape, the in-flight window at 2.5 s against the fixed marks
# (the default). Then, while time is left, two workers (one per GPU) against one, saturated.
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
cp .e2e/call20.sh $R/command.sh
bash benchmarks/e2e/run.sh --help > /dev/null  # installs the wheels once, before two runs share them
run() {  # name, timeout, then options
  local name=$1 t=$2; shift 2
  echo "$name starts at ${SECONDS}s"
  timeout $t bash benchmarks/e2e/run.sh --out $R/$name "$@" > $R/$name.log 2>&1
  echo "$name rc=$? at ${SECONDS}s"; grep -E "^(hardware|saturated|lone|paced|engine)" $R/$name/summary.txt 2>/dev/null || tail -3 $R/$name.log
}
P="--gpus 1 --first-gpu 0 --work /tmp/w0 --kafka-port 39092 --phase-s 10 --warm-s 4 --concurrency 256 --engine-pairs 0 --fractions --lone 100 --rates 163 183"
W="--gpus 1 --first-gpu 1 --work /tmp/w1 --kafka-port 39093 --config 4b --phase-s 15 --warm-s 5 --concurrency 256 --engine-pairs 0 --fractions --lone 20"
( run new 130 $P; run prev 130 $P --worker-root .e2e/prev ) > $R/gpu0.txt 2>&1 &
( run window 200 $W --worker-args "--inflight-target-s 2.5"; run fixed 200 $W ) > $R/gpu1.txt 2>&1 &
wait; cat $R/gpu0.txt $R/gpu1.txt
S="--work /tmp/w0 --phase-s 15 --warm-s 5 --fractions --lone 20 --concurrency 256 --engine-pairs 0"
for name in g2-a g1-a g2-b g1-b; do
  (( SECONDS + 112 < 590 )) || { echo "no time left for $name"; break; }
  gpus=${name:1:1}
  run $name 110 --gpus $gpus $S
done
cd $OUT && tar -czf r.tgz r && rm -rf r
