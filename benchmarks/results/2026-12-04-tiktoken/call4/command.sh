#!/usr/bin/env bash
# GPU call 10: the engine bench (no Kafka), bf16 compiled, tiktoken against the model's own
# tokenizer, alternating, twice each, 16,384 pairs a run
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
for run in compiled:tiktoken compiled:huggingface compiled:tiktoken2 compiled:huggingface2; do
  layers=${run%%:*}; tag=${run##*:}; backend=${tag%2}; name=bench-$layers-$tag
  timeout 120 python -m benchmarks.engine_bench --tokenizer /tmp/tokenizer --pairs 16384 --skip-reference --layers $layers --tokenizer-backend $backend --json > $R/$name.txt 2> $R/$name.err
  echo "$name rc=$?"; grep "^tokenizer\|^throughput\|^device\|^idle\|^model" $R/$name.txt | cut -c1-220; tail -2 $R/$name.err
done
cd $OUT && tar -czf r.tgz r && rm -rf r
