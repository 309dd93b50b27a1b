#!/usr/bin/env bash
# GPU call (one H200): the parity check at a large shape, then the engine bench at that
# shape with CUDA graphs up to 8,192 tokens (the default) and up to 16,384 (the capture
# line on stderr gives each set's graphs, seconds and GPU memory).
# Usage: CONFIG=4b bash .e2e/large.sh
set -u
CONFIG=${CONFIG:?4b or 8b}
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=.:/tmp/site TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" >> $R/gpu.txt
git log -1 --format=%H > $R/commit.txt 2>/dev/null || true
cp .e2e/large.sh $R/command.sh; echo "CONFIG=$CONFIG" >> $R/command.sh
step() {  # name, timeout, command...
  local name=$1 t=$2; shift 2
  (( SECONDS + 20 < 575 )) || { echo "no time left for $name"; return; }
  (( SECONDS + t > 575 )) && t=$(( 575 - SECONDS ))
  echo "$name starts at ${SECONDS}s (timeout $t)"
  timeout $t "$@" > $R/$name.txt 2> $R/$name.err
  echo "$name rc=$? at ${SECONDS}s"
}
step check-$CONFIG ${CHECK_S:-330} python -m benchmarks.gpu_check /tmp/tokenizer 64 --config $CONFIG
grep -E '"variant"|vs reference_fp32|"ok"|max_mem' $R/check-$CONFIG.txt; tail -2 $R/check-$CONFIG.err
for g in 8192 16384; do
  step bench-$CONFIG-g$g 110 python -m benchmarks.engine_bench --tokenizer /tmp/tokenizer --config $CONFIG \
    --pairs 2048 --skip-reference --cuda-graph-max-tokens $g --json
  grep -E "^throughput|^idle engine|^model|warm" $R/bench-$CONFIG-g$g.txt; grep -i "captur" $R/bench-$CONFIG-g$g.err
done
cd $OUT && tar -czf r.tgz r && rm -rf r
CONFIG=4b
