#!/usr/bin/env bash
# GPU call (one H200, the session's last minutes): the 8B parity check on 128 pairs, only
# the default path and transformers' padded batches (is the 64-pair failure the bound's noise?)
set -u
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .e2e/wheels/*.whl >/dev/null 2>&1
export PYTHONPATH=.:/tmp/site TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONUNBUFFERED=1
cp .e2e/last.sh $OUT/command.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/gpu.txt; nproc >> $OUT/gpu.txt
python -m benchmarks.gpu_check /tmp/tokenizer 128 --config 8b --variants packed_compiled,padded_eager > $OUT/check-8b-128.txt 2> $OUT/check-8b-128.err
echo "rc=$? at ${SECONDS}s"; grep -E 'vs reference_fp32|"ok"' $OUT/check-8b-128.txt
