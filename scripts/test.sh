#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite with pytest: unit, distributed (multi-process
# gloo) and GPU tests (the latter skip themselves without a GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# exec: a SIGTERM/SIGINT sent to this script reaches pytest, which ends the processes its tests started.
exec python -m pytest "$@"
