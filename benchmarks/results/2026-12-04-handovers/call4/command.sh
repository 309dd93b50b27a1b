#!/usr/bin/env bash
# GPU call 4 (afternoon): new (numpy packing, one pinned block per graph batch, waiting on
# the device when quiet) against HEAD 69c3a9e (old, .e2e/old): a lone request's steps in
# the engine, then the e2e bench alternating new, old, new
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
cp .e2e/call15.sh $R/command.sh
for side in old new; do
  D=.; [[ $side == old ]] && D=.e2e/old
  (cd $D && PYTHONPATH=. timeout 100 python -m benchmarks.lone_stages --tokenizer /tmp/tokenizer --requests 150 --variants default --json > $R/stages-$side.txt 2> $R/stages-$side.err)
  echo "stages $side rc=$?"; head -22 $R/stages-$side.txt | tail -19
done
E="--phase-s 12 --warm-s 5 --concurrency 256 --engine-pairs 0 --fractions --lone 300 --rates 102 163"
for side in new2 old2 new3; do
  S=benchmarks/e2e/run.sh; [[ $side == old* ]] && S=.e2e/old/benchmarks/e2e/run.sh
  E2E_BUNDLE=$PWD/.e2e timeout 150 bash $S --out $R/e2e-$side $E > $R/e2e-$side.log 2>&1
  echo "e2e $side rc=$?"; grep -E "^(saturated|lone|paced)" $R/e2e-$side/summary.txt 2>/dev/null || tail -3 $R/e2e-$side.log
done
cd $OUT && tar -czf r.tgz r && rm -rf r
