#!/usr/bin/env bash
# Run the test suite again on transformers 5.x (the main run pins 4.57 for LXT): transformers 5 and its own
# dependencies are installed into .cache/tf5 and put first on PYTHONPATH; torch and the rest come from .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -d .cache/tf5/transformers ]; then
  .venv/bin/python -m pip install -q --target .cache/tf5 "transformers==5.24.0"
fi
export PYTHONPATH="$PWD/.cache/tf5" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
.venv/bin/python -c "import transformers; print('transformers', transformers.__version__)"
.venv/bin/python -m pytest -q -m "not compare" "$@"
