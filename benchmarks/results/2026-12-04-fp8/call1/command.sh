#!/usr/bin/env bash
# GPU call 1: FP8/kernels smoke, drift (0.6B), forward-only speed
set -u
R=$OUT/r; mkdir -p $R
tar -xJf .e2e/tokenizer.tar.xz -C /tmp
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .e2e/wheels/*.whl >$R/pip.txt 2>&1
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
nproc >> $R/gpu.txt; python -c "import torch,triton;print(torch.__version__, triton.__version__)" >> $R/gpu.txt
cat > /tmp/smoke.py <<'PY'
import torch, time
from transformers import Qwen3Config, Qwen3Model
import json
from consumer.runtime.qwen3.forward import PackedQwen3
cfg = json.load(open("benchmarks/configs/qwen3-reranker-0.6b.config.json")); cfg["num_hidden_layers"]=2
torch.manual_seed(0)
m = Qwen3Model(Qwen3Config(**cfg)).to("cuda", torch.bfloat16).eval()
seqs=[[5]*300+[7]*20, [5]*300+[8]*40, [9]*77]
pre=[300,300,0]
out={}
for path in ("compiled","kernels","fp8"):
    p=PackedQwen3(m,"cuda",layer_path=path)
    if path=="compiled": p.compile()
    out[path]=p.last_hidden(seqs,pre).float()
    print(path, out[path].shape, float((out[path]-out["compiled"]).abs().max()), float(out["compiled"].abs().max()), flush=True)
PY
timeout 120 python /tmp/smoke.py > $R/smoke.txt 2>&1; echo "smoke rc=$?"; tail -5 $R/smoke.txt
timeout 240 python -m benchmarks.drift --tokenizer /tmp/tokenizer --pairs 512 > $R/drift.txt 2> $R/drift.err; echo "drift rc=$?"; cat $R/drift.txt; tail -3 $R/drift.err
timeout 330 python -m benchmarks.forward_only --tokenizer /tmp/tokenizer --variants default,kernels,fp8,graphs,fp8-graphs --rounds 2 > $R/forward.txt 2> $R/forward.err; echo "forward rc=$?"; cat $R/forward.txt; tail -3 $R/forward.err
cd $OUT && tar -czf r.tgz r && rm -rf r
