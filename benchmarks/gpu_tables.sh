#!/usr/bin/env bash
# Issue #8 on a GPU machine (the device tool): the speed and memory tables on CUDA, and the 1 B decoder at
# 2,048 tokens in bf16, with the machine's own python and torch (src on PYTHONPATH, nothing installed).
#
#   bash benchmarks/gpu_tables.sh all       # one device call (≈ 9 min): check, speed, decoder, memory, each bounded
#   bash benchmarks/gpu_tables.sh check     # benchmarks/gpu_check.py: SDPA backends, tiny HF models, with the
#                                           # machine's own transformers (before the anchors' wheels are put first)
#   bash benchmarks/gpu_tables.sh speed     # torchvision + HF models, fp32, timings against the gradient passes
#   bash benchmarks/gpu_tables.sh decoder   # ≈ 1.1 B LLaMA-shaped decoder, bf16, batch 1 x 2,048 tokens
#   bash benchmarks/gpu_tables.sh memory    # torch.cuda.max_memory_allocated, one process per method
#
# The anchors (zennit 0.5.1, Captum 0.9.0, LXT 2.1 with the transformers 4.57 it needs) travel as wheels in .whl/
# (carry it; see the comment at the end); without them their rows read "failed: ImportError".
# Results go to ${OUT:-results}/{gpu_check,speed_gpu,speed_gpu_bf16,memory_gpu,memory_gpu_bf16}.md.
set -uo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
out=${OUT:-results}
py=${PYTHON:-python3}
mkdir -p "$out"

anchors() {  # put the carried anchor wheels (and transformers 4.57 for LXT) ahead of the machine's packages
  [ -d .whl ] || return 0
  [ -d /tmp/anchors ] || $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/anchors .whl/*.whl
  PYTHONPATH=/tmp/anchors:src $py -c "import transformers, lxt.efficient, zennit, captum" \
    && export PYTHONPATH=/tmp/anchors:src
  echo "anchors: PYTHONPATH=$PYTHONPATH"
}

part() {  # part NAME SECONDS: one part, bounded, its failure noted and the next part run
  local name=$1 secs=$2
  echo "=== $name ($(date +%T), at most ${secs} s)"
  timeout "$secs" bash "$self" "$name" || echo "=== $name ended with $?"
}

case "${1:-speed}" in
  all)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    part check 50    # first: it confirms the fused-attention fix (f7938e1) on the CUDA kernels
    part decoder 150 # session 12: the decoder alone took 118 s
    part speed 210
    part memory 120 ;;  # session 12 (60 + 230 + 120 + 130 s): 5 speed cases, no decoder, 2 memory cases
  check)
    $py benchmarks/gpu_check.py --out "$out" ;;
  speed)
    anchors
    $py benchmarks/speed.py --device cuda --threads 16 --reps 5 --out "$out/speed_gpu.md" \
      --cases resnet50 vgg16 vit_b_16 bert@s128b1 llama300m@s512b4 t5small@s128b4 resnet50@b8 vgg16@b8 \
              vit_b_16@b8 bert@s512b4 llama300m@s128b1 ;;
  decoder)
    anchors
    $py benchmarks/speed.py --device cuda --dtype bf16 --threads 16 --reps 5 --out "$out/speed_gpu_bf16.md" \
      --cases llama1b@s2048b1 ;;
  memory)
    anchors
    $py benchmarks/memory.py --device cuda --dtype bf16 --jobs 1 --threads 16 --out "$out/memory_gpu_bf16.md" \
      --cases llama1b@s2048b1
    $py benchmarks/memory.py --device cuda --jobs 6 --threads 2 --out "$out/memory_gpu.md" \
      --cases resnet50 llama300m@s512b4 bert@s512b4 vgg16 vit_b_16@b8 ;;
  *)
    echo "usage: bash benchmarks/gpu_tables.sh all|check|speed|decoder|memory" >&2; exit 2 ;;
esac

# Fetching the anchors' wheels (here, with pip; lxt 2.1 is an sdist, built to a pure-Python wheel):
#   mkdir -p .whl && pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 \
#     zennit==0.5.1 captum==0.9.0
#   pip download -q --no-deps -d .whl lxt==2.1 && (cd .whl && pip wheel -q --no-deps --no-build-isolation \
#     lxt-2.1.tar.gz -w . && rm lxt-2.1.tar.gz)
