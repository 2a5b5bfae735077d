#!/usr/bin/env bash
# Issue #8 on a GPU machine (the device tool): the speed and memory tables on CUDA, and the 1 B decoder at
# 2,048 tokens in bf16, with the machine's own python and torch (src on PYTHONPATH, nothing installed).
#
#   bash benchmarks/gpu_tables.sh speed     # torchvision + HF models, fp32, timings against the gradient passes
#   bash benchmarks/gpu_tables.sh decoder   # ≈ 1.1 B LLaMA-shaped decoder, bf16, batch 1 x 2,048 tokens
#   bash benchmarks/gpu_tables.sh memory    # torch.cuda.max_memory_allocated, one process per method
#
# Each part is sized to fit one device call (10 minutes); results go to ${OUT:-results}/{speed,memory}_gpu*.md.
# Anchors that the machine lacks (zennit, Captum, LXT) show as "failed: ImportError" rows.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${OUT:-results}
py=${PYTHON:-python}
mkdir -p "$out"
case "${1:-speed}" in
  speed)
    $py benchmarks/speed.py --device cuda --threads 16 --reps 5 --out "$out/speed_gpu.md" \
      --cases vgg16 resnet50 vit_b_16 vit_b_16@b8 bert@s128b1 bert@s512b4 llama300m@s512b4 t5small@s128b4 ;;
  decoder)
    $py benchmarks/speed.py --device cuda --dtype bf16 --threads 16 --reps 5 --out "$out/speed_gpu_bf16.md" \
      --cases llama1b@s2048b1 ;;
  memory)
    $py benchmarks/memory.py --device cuda --out "$out/memory_gpu.md" \
      --cases vgg16 resnet50 vit_b_16@b8 bert@s512b4 llama300m@s512b4
    $py benchmarks/memory.py --device cuda --dtype bf16 --out "$out/memory_gpu_bf16.md" --cases llama1b@s2048b1 ;;
  *)
    echo "usage: bash benchmarks/gpu_tables.sh speed|decoder|memory" >&2; exit 2 ;;
esac
