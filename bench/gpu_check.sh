#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py), one command, no downloads:
#   bash bench/gpu_check.sh --out DIR          # on the GPU machine, with .whl/ carried
#   bash bench/gpu_check.sh --dry-run --out DIR  # its rows on this CPU, tiny
# Math-Verify, if not importable, is installed from the wheels in .whl/ into /tmp/site (the GPU
# machine has no package index); without either, gpu_check.py stops and says what to download.
# PYTHON: the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import math_verify" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PYTHON" bench/gpu_check.py "$@"
