#!/usr/bin/env bash
# GPU call 4: parity check (every default path + kernels, fp8 reported), kernel profile of fp8 vs default
set -u
mkdir -p $OUT/r
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$OUT/r/pip.txt 2>&1
OUT=$OUT/r TOK=/tmp/tokenizer bash benchmarks/gpu_session.sh check profile
cd $OUT && tar -czf r.tgz r && rm -rf r
