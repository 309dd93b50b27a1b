#!/usr/bin/env bash
# GPU call 5: the engine (defaults) and the strong reference, compiled and not, in one call
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
timeout 100 python -m benchmarks.engine_bench --tokenizer /tmp/tokenizer --pairs 8192 --skip-reference --json > $R/engine.txt 2> $R/engine.err
echo "engine rc=$?"; grep "^throughput\|^model" $R/engine.txt
timeout 60 python -m benchmarks.strong_reference --tokenizer /tmp/tokenizer --pairs 4096 --compile off > $R/strong-eager.txt 2> $R/strong-eager.err
echo "strong eager rc=$?"; cat $R/strong-eager.txt
timeout 290 python -m benchmarks.strong_reference --tokenizer /tmp/tokenizer --pairs 4096 --compile on > $R/strong-compiled.txt 2> $R/strong-compiled.err
echo "strong compiled rc=$?"; cat $R/strong-compiled.txt; tail -3 $R/strong-compiled.err
cd $OUT && tar -czf r.tgz r && rm -rf r
