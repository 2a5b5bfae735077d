#!/usr/bin/env bash
# Set up (if needed) and run the offline example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
.venv/bin/python examples/quickstart.py
