#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py), one command, no downloads:
#   bash bench/gpu_check.sh
# Math-Verify travels as wheels in .whl/ (see bench/README.md); installed into /tmp/site if present.
set -u
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import math_verify" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
exec timeout 900 python3 bench/gpu_check.py
