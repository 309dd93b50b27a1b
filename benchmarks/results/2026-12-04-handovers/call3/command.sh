#!/usr/bin/env bash
# GPU call 3 (afternoon): packing with numpy and one pinned block per graph batch (new)
# against HEAD 69c3a9e (old, in .e2e/old): parity check, a lone request's steps, e2e
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
cp .e2e/call14.sh $R/command.sh
timeout 160 python -m benchmarks.gpu_check /tmp/tokenizer > $R/gpu_check.txt 2> $R/gpu_check.err
echo "gpu_check rc=$?"; tail -4 $R/gpu_check.txt
for side in old new; do
  P=.; [[ $side == old ]] && P=.e2e/old:.
  PYTHONPATH=$P timeout 100 python -m benchmarks.lone_stages --tokenizer /tmp/tokenizer --requests 150 --variants default poll --json > $R/stages-$side.txt 2> $R/stages-$side.err
  echo "stages $side rc=$?"; head -22 $R/stages-$side.txt | tail -19
done
E="--phase-s 12 --warm-s 5 --concurrency 256 --engine-pairs 0 --fractions --lone 300 --rates 163"
for side in new old; do
  S=benchmarks/e2e/run.sh; [[ $side == old ]] && S=.e2e/old/benchmarks/e2e/run.sh
  E2E_BUNDLE=$PWD/.e2e timeout 140 bash $S --out $R/e2e-$side $E > $R/e2e-$side.log 2>&1
  echo "e2e $side rc=$?"; grep -E "^(saturated|lone|paced)" $R/e2e-$side/summary.txt 2>/dev/null || tail -3 $R/e2e-$side.log
done
cd $OUT && tar -czf r.tgz r && rm -rf r
