#!/usr/bin/env bash
# One-time set-up of the CPU development environment: a virtualenv in .venv with the pinned
# CPU stack (torch 2.13.0, megatron-core 0.16.1) and this package installed editable.
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
echo "[setup] installing moc-megatron with the CPU pins (torch==2.13.0, megatron-core==0.16.1) and the hf extra (transformers 5.x)"
pip install --quiet --disable-pip-version-check -e ".[cpu,dev,hf]"
python -W ignore -c "import torch, megatron.core as mc; print(f'[setup] torch {torch.__version__}, megatron-core {mc.__version__}')"
