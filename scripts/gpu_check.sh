#!/usr/bin/env bash
# GPU readiness check for a lent GPU machine, in one run of under 8 minutes; results under $OUT (at most 7 files).
#   0. installs megatron-core from the wheels brought along in gpu_wheels/ (the GPU image lacks it and has no
#      network; fill the folder here first with scripts/fetch_gpu_wheels.sh): one --target folder per version;
#   1. tests/gpu/test_kernels_gpu.py: the compiled Triton chapter attention against gather on CUDA (fp32 / fp16 /
#      bf16, both schedules, both gatings, determinism of the backward); needs no megatron-core;
#   2. the rest of tests/gpu/ once per megatron-core version (0.16.1, the pinned one, and 0.19.2, the newest) on
#      PYTHONPATH: the memory layer and the model on CUDA, moc-tiny's forward/backward on that version
#      (test_megatron_versions_gpu.py checks the version imported is the one named), one training step of moc-tiny
#      through pretrain_moc.py under torchrun with NCCL (test_pretrain_gpu.py);
#   3. bench/bench_chapter_attention_gpu.py on the paper's shapes (bf16): triton vs blocked vs gather.
# Every step has a time limit and the whole run stops starting steps at BUDGET seconds (default 470).
#
# Here:   bash scripts/fetch_gpu_wheels.sh
#         DRY_RUN=1 bash scripts/gpu_check.sh    # installs the wheels, prints each step, runs no GPU step
# On the lent GPU, through the device tool (see docs/kernels.md):
#         run(command="bash scripts/gpu_check.sh", carry=["gpu_wheels"], timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
WHEELS=${WHEELS:-gpu_wheels}
SITE=${SITE:-/tmp/moc_gpu_site}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
BASE_PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND (output in $OUT/NAME.txt) within LIMIT_S and what is left of BUDGET.
step() {
  local name=$1 limit=$2 left rc start
  shift 2
  left=$((BUDGET - SECONDS))
  if [ "$DRY_RUN" = 1 ]; then
    say "[dry-run] $name (limit ${limit}s): $*"
    return 0
  fi
  if [ "$left" -lt 20 ]; then
    say "$name: not run (${left}s of the ${BUDGET}s budget left)"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  say "$name (exit $rc, $((SECONDS - start))s): $(grep -E 'passed|failed|error|skipped' "$OUT/$name.txt" | tail -1)"
}

say "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
$PYTHON -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.is_available())" 2>&1 | tee -a "$SUMMARY"
$PYTHON -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1 | tee -a "$SUMMARY"

# 0. megatron-core, one --target folder per version found in $WHEELS/megatron-core-<version>/.
VERSIONS=()
: > "$OUT/pip.txt"
for dir in "$WHEELS"/megatron-core-*/; do
  [ -d "$dir" ] || continue
  version=$(basename "$dir")
  version=${version#megatron-core-}
  if $PYTHON -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/$version" \
      "$dir"*.whl >>"$OUT/pip.txt" 2>&1; then
    got=$(PYTHONPATH="$SITE/$version" $PYTHON -c "import megatron.core as m, os; print(m.__version__, 'from', os.path.dirname(m.__file__))" 2>>"$OUT/pip.txt")
    say "megatron-core $version: installed in $SITE/$version (imports as ${got:-nothing})"
    VERSIONS+=("$version")
  else
    say "megatron-core $version: install failed (see pip.txt)"
  fi
done
[ ${#VERSIONS[@]} -eq 0 ] && say "no megatron-core installed from $WHEELS/ (missing, or not for this Python: run scripts/fetch_gpu_wheels.sh here and carry gpu_wheels); the model tests do not run"

# 1. the kernels (no megatron-core needed).
PYTHONPATH="$BASE_PYTHONPATH" step kernel_tests 170 \
  $PYTHON -m pytest tests/gpu/test_kernels_gpu.py -q -x -p no:cacheprovider

# 2. the model on each megatron-core.
for version in "${VERSIONS[@]}"; do
  PYTHONPATH="$SITE/$version:$BASE_PYTHONPATH" MOC_EXPECT_MEGATRON_CORE="$version" step "mcore-$version" 110 \
    $PYTHON -m pytest tests/gpu -q -s -p no:cacheprovider --ignore=tests/gpu/test_kernels_gpu.py
done

# 3. the benchmark.
PYTHONPATH="$BASE_PYTHONPATH" step bench 100 \
  $PYTHON bench/bench_chapter_attention_gpu.py --dtype bfloat16 --json "$OUT/bench.json"
[ -f "$OUT/bench.txt" ] && grep -E '^\|' "$OUT/bench.txt" | tee -a "$SUMMARY"
say "== done in ${SECONDS}s"
