#!/usr/bin/env bash
# GPU readiness check for a lent GPU machine, in one run of under 8 minutes; results under $OUT.
#   1. the compiled Triton chapter attention against gather on CUDA (tests/gpu/test_kernels_gpu.py:
#      fp32 / fp16 / bf16, both schedules, both gatings, determinism of the backward);
#   2. the rest of tests/gpu/ when megatron-core imports (the GPU image lacks it: point WHEELS at a folder
#      of wheels brought along, e.g. megatron-core for Python 3.12, and they are installed with --no-index);
#   3. bench/bench_chapter_attention_gpu.py on the paper's shapes (bf16): triton vs blocked vs gather.
# Usage: OUT=/path WHEELS=/path/to/wheels bash scripts/gpu_check.sh   (both optional)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

say "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  2>&1 | tee -a "$SUMMARY"
if [ -n "${WHEELS:-}" ] && ! python -c "import megatron.core" 2>/dev/null; then
  pip install --quiet --no-index --no-deps --target "$OUT/site" "$WHEELS"/*.whl >"$OUT/pip.txt" 2>&1 \
    && export PYTHONPATH="$OUT/site:$PYTHONPATH"
fi

timeout 240 python -m pytest tests/gpu/test_kernels_gpu.py -q -x -p no:cacheprovider >"$OUT/kernel_tests.txt" 2>&1
say "kernel tests (exit $?): $(tail -1 "$OUT/kernel_tests.txt")"

if python -c "import megatron.core" 2>/dev/null; then
  timeout 120 python -m pytest tests/gpu -q -p no:cacheprovider --ignore=tests/gpu/test_kernels_gpu.py \
    >"$OUT/gpu_tests.txt" 2>&1
  say "other GPU tests (exit $?): $(tail -1 "$OUT/gpu_tests.txt")"
else
  say "other GPU tests: skipped (megatron-core does not import; set WHEELS)"
fi

timeout 180 python bench/bench_chapter_attention_gpu.py --dtype bfloat16 --json "$OUT/bench.json" >"$OUT/bench.txt" 2>&1
say "benchmark (exit $?):"
grep -E '^\|' "$OUT/bench.txt" | tee -a "$SUMMARY"
