#!/usr/bin/env bash
# Set up (if needed) and run the offline demo: a pretrained EfficientNet-Lite0 explaining photos and a sentiment
# classifier explaining sentences, written as one page (dynamiclrp-demo/index.html). Extra arguments go to
# `dynamiclrp demo` (e.g. --out DIR, --quick). The tiny-CNN quickstart stays at examples/quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
.venv/bin/dynamiclrp demo "$@"
