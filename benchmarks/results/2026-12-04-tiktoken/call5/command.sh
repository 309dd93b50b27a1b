#!/usr/bin/env bash
# GPU call 11: the lone request again, tiktoken (defaults) against the model's own
# tokenizer, alternating, one paced phase at 80%
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
E="--phase-s 12 --warm-s 5 --concurrency 256 --engine-pairs 0 --fractions --lone 300 --rates 163"
echo "$E: tikA (defaults: tiktoken); hf (--tokenizer-backend huggingface); tikB" > $R/command.txt
for run in tikA hf tikB; do
  extra=(); [[ $run == hf ]] && extra=(--worker-args "--tokenizer-backend huggingface")
  timeout 140 bash benchmarks/e2e/run.sh --out $R/$run $E "${extra[@]}" > $R/$run.log 2>&1
  echo "$run rc=$?"; grep -E "^(saturated|lone|paced)" $R/$run/summary.txt 2>/dev/null || tail -3 $R/$run.log
done
cd $OUT && tar -czf r.tgz r && rm -rf r
