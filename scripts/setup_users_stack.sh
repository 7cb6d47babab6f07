#!/usr/bin/env bash
# One-time set-up of the users' stack, as in NVIDIA's containers: a virtualenv in .venv-users with Python 3.12,
# the newest megatron-core and torch from PyPI for Python 3.12 (a CUDA build, 5.1 GB installed, which runs
# on the CPU), and this package installed editable. Re-running is cheap: pip skips what is installed.
#   bash scripts/setup_users_stack.sh
#   USERS_MEGATRON_CORE=0.18.2 bash scripts/setup_users_stack.sh     # another release (a fresh .venv-users)
set -euo pipefail
cd "$(dirname "$0")/.."
MEGATRON_CORE=${USERS_MEGATRON_CORE:-0.19.2}
TORCH=${USERS_TORCH:-2.13.0}
VENV=.venv-users
if [ -z "${USERS_PYTHON:-}" ]; then
  # pyenv's shim picks the interpreter from PYENV_VERSION; without pyenv, python3.12 on PATH.
  if command -v pyenv >/dev/null 2>&1 && pyenv versions --bare | grep -qx '3\.12\.[0-9]*'; then
    export PYENV_VERSION=$(pyenv versions --bare | grep -x '3\.12\.[0-9]*' | tail -1)
  fi
  USERS_PYTHON=python3.12
fi
if ! command -v "$USERS_PYTHON" >/dev/null 2>&1 || ! "$USERS_PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  echo "[setup-users] no Python 3.12 ($USERS_PYTHON); install one (e.g. pyenv install 3.12) or set USERS_PYTHON" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-users] creating $VENV with $("$USERS_PYTHON" --version)"
  "$USERS_PYTHON" -m venv "$VENV"
fi
echo "[setup-users] installing torch==$TORCH (PyPI's build for Python 3.12), megatron-core==$MEGATRON_CORE, moc-megatron[dev,hf]"
if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev,hf]" "torch==$TORCH" \
    "megatron-core==$MEGATRON_CORE" >"$VENV/pip-install.log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$VENV/pip-install.log" | tail -20 >&2
  echo "[setup-users] pip install failed (whole log: $VENV/pip-install.log)" >&2
  exit 1
fi
"$VENV/bin/python" -c "import sys, torch, megatron.core as mc; print(f'[setup-users] python {sys.version.split()[0]}, \
torch {torch.__version__}, megatron-core {mc.__version__}')"
