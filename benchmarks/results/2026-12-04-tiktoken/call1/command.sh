#!/usr/bin/env bash
# GPU call 7: tiktoken against the model's own tokenizer, on the lone path and through Kafka
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt; nproc >> $R/gpu.txt
python -c "import tiktoken, regex; print('tiktoken', tiktoken.__version__)" >> $R/gpu.txt 2>&1
git log -1 --format=%H >> $R/gpu.txt 2>/dev/null
timeout 80 python -m benchmarks.lone_path --tokenizer /tmp/tokenizer --requests 300 > $R/lone_path.txt 2>&1
cat $R/lone_path.txt
E="--phase-s 12 --warm-s 5 --concurrency 256 --engine-pairs 0 --fractions --rates 102 163 183 --lone 200"
echo "$E; tik1 (defaults: auto = tiktoken); hf1 (--tokenizer-backend huggingface); tik2" > $R/command.txt
for run in tik1 hf1 tik2; do
  extra=(); [[ $run == hf* ]] && extra=(--worker-args "--tokenizer-backend huggingface")
  timeout 150 bash benchmarks/e2e/run.sh --out $R/$run $E "${extra[@]}" > $R/$run.log 2>&1
  echo "$run rc=$?"; grep -E "^(saturated|lone|paced)" $R/$run/summary.txt 2>/dev/null || tail -3 $R/$run.log
  grep -h "tokenizing Qwen3" $R/$run/worker-gpu0.log 2>/dev/null | head -1 | cut -c1-200
done
cd $OUT && tar -czf r.tgz r && rm -rf r
