#!/usr/bin/env bash
# One GPU session's measurements, in order, each step's output saved under $OUT:
# parity at the full 0.6B shape, the packed forward's variants, then the engine against
# the reference recipe. Run from the repository root on the device machine:
#   OUT=/tmp/out TOK=.devcache/qwen3_tok bash benchmarks/gpu_session.sh [steps...]
# Steps: check check-large attention variants profile bench layers large drift
# (default: check variants bench). layers: the engine bench once per layer path (bf16
# compiled, bf16 fused kernels, FP8, FP8 for the normed GEMMs only); large: the 4B and 8B
# shapes, bf16 against FP8; check-large: the parity check at 4B and 8B on 128 pairs
# (the model card's own bf16 run, its yardstick, is too noisy on 64 at 8B);
# drift: scores of each path against the model card in fp32.
# The worker's code needs pydantic (its settings objects), which a bare GPU image may lack:
# carry the wheels of benchmarks/e2e/pack.sh (.e2e/wheels) and they are installed first.
set -u
OUT=${OUT:?set OUT to a folder for the outputs}
if ! python -c "import pydantic" 2>/dev/null && [ -d .e2e/wheels ]; then
  python -m pip install -q --no-index --no-deps --target /tmp/e2e-site .e2e/wheels/*.whl
  export PYTHONPATH="/tmp/e2e-site${PYTHONPATH:+:$PYTHONPATH}"
fi
TOK=${TOK:-.devcache/qwen3_tok}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(check variants bench)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for step in "${steps[@]}"; do
  start=$(date +%s)
  case $step in
    check) timeout 240 python -m benchmarks.gpu_check "$TOK" 64 ;;
    check-large) for config in 4b 8b; do
        timeout 300 python -m benchmarks.gpu_check "$TOK" 128 --config $config \
          --variants packed_compiled,packed_eager,packed_kernels,padded_eager
      done ;;
    attention) timeout 120 python -m benchmarks.attention_kernels ;;
    variants) timeout 300 python -m benchmarks.forward_only --tokenizer "$TOK" --variants default,graphs,torch-qk,no-share ;;
    profile) timeout 300 python -m benchmarks.forward_only --tokenizer "$TOK" --variants fp8,default,kernels --rounds 2 --profile ;;
    bench) timeout 300 python -m benchmarks.engine_bench --tokenizer "$TOK" --pairs 16384 --reference-pairs 4096 --json ;;
    layers) for layers in compiled fp8 kernels fp8-normed; do
        timeout 110 python -m benchmarks.engine_bench --tokenizer "$TOK" --pairs 8192 --skip-reference --layers $layers --json
      done ;;
    large) for config in 4b 8b; do for layers in compiled fp8; do
        timeout 170 python -m benchmarks.engine_bench --tokenizer "$TOK" --config $config --pairs 4096 --skip-reference --layers $layers --json
      done; done ;;
    drift) timeout 200 python -m benchmarks.drift --tokenizer "$TOK" --pairs 512 --layers compiled,kernels,fp8,fp8-normed
      timeout 150 python -m benchmarks.drift --tokenizer "$TOK" --config 4b --pairs 256 --layers compiled,fp8 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac >"$OUT/$step.txt" 2>"$OUT/$step.err"
  echo "step $step exit $? in $(( $(date +%s) - start )) s"
  grep -v '^\s*$' "$OUT/$step.txt" | tail -25
done
