#!/usr/bin/env bash
# GPU call 2: drift with fp8-normed (0.6B), engine bench per layer path (0.6B)
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
timeout 200 python -m benchmarks.drift --tokenizer /tmp/tokenizer --pairs 512 --layers compiled,kernels,fp8,fp8-normed > $R/drift-0.6b.txt 2> $R/drift-0.6b.err; echo "drift rc=$?"; grep -v warmup $R/drift-0.6b.txt
for layers in compiled fp8 kernels fp8-normed; do
  timeout 110 python -m benchmarks.engine_bench --tokenizer /tmp/tokenizer --pairs 8192 --skip-reference --layers $layers --json > $R/bench-0.6b-$layers.txt 2> $R/bench-0.6b-$layers.err
  echo "bench $layers rc=$?"; grep "^throughput\|^idle engine\|^model" $R/bench-0.6b-$layers.txt
done
cd $OUT && tar -czf r.tgz r && rm -rf r
