#!/usr/bin/env bash
# GPU call 1 of issue 29 (one H100 or H200; run from the repository root with the
# Qwen3 tokenizer files in $TOK): the attention paths on the same batches, then the
# packed forward's kernel profile before (default tile) and after (the fastest Triton
# tile of the comparison that stays as close to fp32 as the default) at the 0.6B and 4B
# shapes, FP8 with 0, 2 and 4 last layers in bf16 at 4B (speed), and their drift at 0.6B.
set -u
TOK=${TOK:?the tokenizer folder}
R=$OUT
export PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
} > $R/gpu.txt 2>&1
LIMIT=${LIMIT:-250}
step() {  # name, timeout, command...
  local name=$1 t=$2; shift 2
  (( SECONDS + 15 < LIMIT )) || { echo "no time left for $name"; return; }
  (( SECONDS + t > LIMIT )) && t=$(( LIMIT - SECONDS ))
  echo "$name starts at ${SECONDS}s (timeout $t)"
  timeout $t "$@" > $R/$name.txt 2> $R/$name.err
  echo "$name rc=$? at ${SECONDS}s"
}
step attention 100 python -m benchmarks.attention_kernels
tail -20 $R/attention.txt
# the fastest tile per head group among those as close to fp32 as the default tile (+10%)
read W2 W4 < <(python - $R/attention.txt <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{"heads"')]
ms, err = collections.defaultdict(list), collections.defaultdict(float)
for r in rows:
    if r["kernel"].startswith("triton_") and "ms_per_call" in r:
        key = (r["heads"], r["kernel"][7:])
        ms[key].append(r["ms_per_call"]); err[key] = max(err[key], r["max_abs_diff_vs_fp32"])
out = []
for heads in ("16/8", "32/8"):
    base = err.get((heads, "64/32/4/3"), 1.0) * 1.1
    ok = [(sum(v) / len(v), t) for (h, t), v in ms.items() if h == heads and len(v) == 2 and err[(h, t)] <= base]
    out.append(min(ok)[1] if ok else "64/32/4/3")
print(*out)
PY
)
echo "fastest tiles: 16/8 $W2, 32/8 $W4" | tee $R/winners.txt
step profile-0.6b 45 python -m benchmarks.forward_only --tokenizer $TOK --pairs 2048 --rounds 2 --profile --variants default,attention=$W2
grep -E '"round"|"profile"|warmup' $R/profile-0.6b.txt
step profile-fp8-4b 95 python -m benchmarks.forward_only --tokenizer $TOK --config 4b --pairs 1024 --rounds 1 --profile --variants default,attention=$W4,fp8-last0,fp8-last2,fp8-last4
grep -E '"round"|"profile"|warmup' $R/profile-fp8-4b.txt
step drift-0.6b 60 python -m benchmarks.drift --tokenizer $TOK --pairs 256 --layers compiled,fp8-last0,fp8-last2,fp8-last4
grep -E 'vs|advice' $R/drift-0.6b.txt
