#!/usr/bin/env bash
# Create .venv (if missing) and install dynamiclrp with the test extras, pinned by constraints-ci.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test,dev,demo]" -c constraints-ci.txt
