#!/usr/bin/env bash
# GPU call 6: the engine bench's new device-busy share from CUDA events, bf16 and fp8
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
for layers in compiled fp8; do
  timeout 90 python -m benchmarks.engine_bench --tokenizer /tmp/tokenizer --pairs 8192 --skip-reference --layers $layers --json > $R/bench-$layers.txt 2> $R/bench-$layers.err
  echo "bench $layers rc=$?"; grep "^throughput\|^padding\|^device\|^idle" $R/bench-$layers.txt; tail -2 $R/bench-$layers.err
done
cd $OUT && tar -czf r.tgz r && rm -rf r
