#!/usr/bin/env bash
# The test suite on the users' stack (Python 3.12, the newest megatron-core, PyPI's torch; see
# scripts/setup_users_stack.sh): by default the unit tier and the distributed checkpoint, restart and layout
# tests. Extra arguments go to pytest (test paths among them replace the default selection).
#   bash scripts/test_users_stack.sh -q
#   bash scripts/test_users_stack.sh -q tests/unit/test_hf.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_users_stack.sh
DEFAULT_TESTS=(tests/unit tests/distributed/test_elastic_restart.py tests/distributed/test_wide_layout.py
               tests/distributed/test_training_parallel.py)
selected=()
for arg in "$@"; do
  case "$arg" in tests/*) selected+=("$arg") ;; esac
done
# Checked on the development stack only, to keep CI short: the fp32 kernels' sm_90 compile (minutes,
# reference-speed kernels), the cross-version checkpoint tests (that run does both directions), and the
# knowledge example's toy run (minutes of subprocesses, each tool already tested on this stack).
[ ${#selected[@]} -eq 0 ] && set -- "$@" "${DEFAULT_TESTS[@]}" \
  --deselect "tests/unit/test_compile_sm90.py::test_every_kernel_variant_compiles_for_sm90[paper-fp32]" \
  --deselect tests/unit/test_checkpoint_across_versions.py \
  --deselect tests/unit/test_knowledge_example.py
# The cross-version checkpoint tests resume this stack's checkpoints on the development stack when it is set up.
if [ -z "${MOC_OTHER_STACK_PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  export MOC_OTHER_STACK_PYTHON=$PWD/.venv/bin/python
fi
.venv-users/bin/python -m pytest "$@"
