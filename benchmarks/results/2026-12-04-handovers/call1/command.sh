#!/usr/bin/env bash
# GPU call 1 of 2026-12-04 (afternoon): a lone request's steps in the engine, bf16 and FP8
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
cp .e2e/call12.sh $R/command.sh
timeout 200 python -m benchmarks.lone_stages --tokenizer /tmp/tokenizer --requests 150 --json > $R/stages-bf16.txt 2> $R/stages-bf16.err
echo "bf16 rc=$?"; cat $R/stages-bf16.txt | head -16
timeout 150 python -m benchmarks.lone_stages --tokenizer /tmp/tokenizer --requests 150 --layers fp8 --variants default poll --json > $R/stages-fp8.txt 2> $R/stages-fp8.err
echo "fp8 rc=$?"; cat $R/stages-fp8.txt | head -16
E="--phase-s 12 --warm-s 5 --concurrency 256 --engine-pairs 0 --fractions --lone 300 --rates 163"
timeout 150 bash benchmarks/e2e/run.sh --out $R/e2e $E > $R/e2e.log 2>&1
echo "e2e rc=$?"; grep -E "^(saturated|lone|paced)" $R/e2e/summary.txt 2>/dev/null || tail -3 $R/e2e.log
cd $OUT && tar -czf r.tgz r && rm -rf r
