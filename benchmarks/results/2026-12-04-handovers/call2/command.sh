#!/usr/bin/env bash
# GPU call 2 (afternoon): a lone request's prepare and launch in finer steps; host torch ops
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
cp .e2e/call13.sh $R/command.sh
python -m benchmarks.host_ops > $R/host_ops.txt 2>&1; echo "host_ops rc=$?"; cat $R/host_ops.txt
timeout 200 python -m benchmarks.lone_stages --tokenizer /tmp/tokenizer --requests 100 --variants default poll --json > $R/stages-bf16.txt 2> $R/stages-bf16.err
echo "bf16 rc=$?"; head -24 $R/stages-bf16.txt; tail -3 $R/stages-bf16.err
cd $OUT && tar -czf r.tgz r && rm -rf r
