#!/usr/bin/env bash
# GPU call 8: a lone request with tiktoken split over helper threads, against the model's
# own tokenizer, and with FP8 layers, through Kafka
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
timeout 80 python -m benchmarks.lone_path --tokenizer /tmp/tokenizer --requests 300 > $R/lone_path.txt 2>&1
cat $R/lone_path.txt
E="--phase-s 12 --warm-s 5 --concurrency 256 --engine-pairs 0 --fractions --lone 200"
echo "$E --rates 102 163 183: tik (defaults: auto = tiktoken, split over helpers); hf (--tokenizer-backend huggingface); $E --rates 163: fp8 (--layers fp8, tiktoken)" > $R/command.txt
for run in tik hf fp8; do
  extra=(--rates 102 163 183); [[ $run == hf ]] && extra+=(--worker-args "--tokenizer-backend huggingface")
  [[ $run == fp8 ]] && extra=(--rates 163 --worker-args "--layers fp8")
  timeout 160 bash benchmarks/e2e/run.sh --out $R/$run $E "${extra[@]}" > $R/$run.log 2>&1
  echo "$run rc=$?"; grep -E "^(saturated|lone|paced)" $R/$run/summary.txt 2>/dev/null || tail -3 $R/$run.log
done
cd $OUT && tar -czf r.tgz r && rm -rf r
