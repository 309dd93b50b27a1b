#!/usr/bin/env bash
# GPU call 3: engine bench at 4B and 8B, bf16 (compiled) against fp8; drift at 4B
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
for config in 4b 8b; do
for layers in compiled fp8; do
  timeout 170 python -m benchmarks.engine_bench --tokenizer /tmp/tokenizer --config $config --pairs 4096 --skip-reference --layers $layers --json > $R/bench-$config-$layers.txt 2> $R/bench-$config-$layers.err
  echo "bench $config $layers rc=$?"; grep "^throughput\|^idle engine\|^model\|executed" $R/bench-$config-$layers.txt
done
done
timeout 150 python -m benchmarks.drift --tokenizer /tmp/tokenizer --config 4b --pairs 256 --layers compiled,fp8 > $R/drift-4b.txt 2> $R/drift-4b.err; echo "drift rc=$?"; grep -v warmup $R/drift-4b.txt
cd $OUT && tar -czf r.tgz r && rm -rf r
