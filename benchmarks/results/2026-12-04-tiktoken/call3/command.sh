#!/usr/bin/env bash
# GPU call 9: the engine bench (no Kafka) with tiktoken against the model's own tokenizer,
# bf16 compiled and FP8: throughput, device busy from CUDA events, idle request latency
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
for run in fp8:tiktoken fp8:huggingface compiled:huggingface compiled:tiktoken; do
  layers=${run%%:*}; backend=${run##*:}; name=bench-$layers-$backend
  timeout 120 python -m benchmarks.engine_bench --tokenizer /tmp/tokenizer --pairs 8192 --skip-reference --layers $layers --tokenizer-backend $backend --json > $R/$name.txt 2> $R/$name.err
  echo "$name rc=$?"; grep "^tokenizer\|^throughput\|^device\|^idle\|^model" $R/$name.txt | cut -c1-220; tail -2 $R/$name.err
done
cd $OUT && tar -czf r.tgz r && rm -rf r
