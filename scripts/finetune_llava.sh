#!/usr/bin/env bash
# LLaVA-1.5 stage 2: visual instruction tuning (projector + LM, `vicuna_v1` template, lr 2e-5).
# Runs stage 1 first (scripts/pretrain_llava.sh) when its output folder is missing.
#
#   bash scripts/finetune_llava.sh                      # CPU default -> runs/llava-finetune
#   bash scripts/finetune_llava.sh --train-router       # also tune the CLIP-MoE routers (adds the MoE aux loss)
#
# Real parts: LLAVA_DATA=playground/data/llava_v1_5_mix665k.json LLAVA_IMAGES=playground/data LLAVA_FULL=1 ...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
PRETRAIN_OUT=${LLAVA_PRETRAIN_OUT:-runs/llava-pretrain}

if [[ ! -f "$PRETRAIN_OUT/config.json" ]]; then
  echo "[finetune_llava.sh] $PRETRAIN_OUT missing: running stage 1 first"
  LLAVA_DATA="${LLAVA_PRETRAIN_DATA:-}" LLAVA_IMAGES="${LLAVA_PRETRAIN_IMAGES:-}" bash scripts/pretrain_llava.sh
fi

args=(--stage finetune --model "$PRETRAIN_OUT" --output-dir "${LLAVA_FINETUNE_OUT:-runs/llava-finetune}")
[[ -n "${LLAVA_DATA:-}" ]] && args+=(--data-path "$LLAVA_DATA")
[[ -n "${LLAVA_IMAGES:-}" ]] && args+=(--image-folder "$LLAVA_IMAGES")
if [[ -n "${LLAVA_FULL:-}" ]]; then
  args+=(--config configs/llava/finetune.yaml)   # 8 GPUs x 16 x 1 = global batch 128
else
  # tiny CPU default: one BLAS thread is faster for these small matrices on a busy 2-core machine, and one
  # DataLoader worker overlaps image decoding with the step
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  args+=(--dataloader-num-workers 1)
  # CPU default: a LLaVA-size lr (2e-5) barely moves a random tiny LM in one epoch, so the tiny default trains
  # for 6 epochs at 1e-3 (3 epochs left it at chance on Shapes MMBench, docs/results.md; override with
  # --learning-rate / --num-train-epochs)
  args+=(--per-device-train-batch-size 16 --learning-rate 1e-3 --num-train-epochs 6 --logging-steps 10
         --save-steps 200 --model-max-length 512)
fi
exec "$PYTHON" scripts/train_llava.py "${args[@]}" "$@"
