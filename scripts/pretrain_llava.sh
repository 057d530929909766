#!/usr/bin/env bash
# LLaVA-1.5 stage 1: projector pretraining (projector only, `plain` template, caption data, lr 1e-3).
#
#   bash scripts/pretrain_llava.sh                 # CPU default: Shapes world, runs/clip-moe, tiny Llama -> runs/llava-pretrain
#   bash scripts/pretrain_llava.sh --max-steps 10  # extra flags go to scripts/train_llava.py
#
# Real parts (LLaVA-1.5 hyperparameters, global batch 256; see docs/llava.md for multi-GPU launches):
#   LLAVA_VISION_TOWER=runs/clip-moe-vit-l14-336 LLAVA_LM=lmsys/vicuna-7b-v1.5 \
#   LLAVA_DATA=playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \
#   LLAVA_IMAGES=playground/data/LLaVA-Pretrain/images LLAVA_FULL=1 bash scripts/pretrain_llava.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

args=(--stage pretrain --output-dir "${LLAVA_PRETRAIN_OUT:-runs/llava-pretrain}")
[[ -n "${LLAVA_VISION_TOWER:-}" ]] && args+=(--vision-tower "$LLAVA_VISION_TOWER")
[[ -n "${LLAVA_LM:-}" ]] && args+=(--language-model "$LLAVA_LM")
[[ -n "${LLAVA_DATA:-}" ]] && args+=(--data-path "$LLAVA_DATA")
[[ -n "${LLAVA_IMAGES:-}" ]] && args+=(--image-folder "$LLAVA_IMAGES")
if [[ -n "${LLAVA_FULL:-}" ]]; then
  # LLaVA-1.5: 8 GPUs x 32 per device x 1 accumulation = 256 (adapt --gradient-accumulation-steps to your GPU count)
  args+=(--config configs/llava/pretrain.yaml)
else
  # tiny CPU default: one BLAS thread is faster for these small matrices on a busy 2-core machine, and one
  # DataLoader worker overlaps image decoding with the step
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  args+=(--dataloader-num-workers 1)
  # CPU default: one epoch over the Shapes captions with a tiny LM
  args+=(--per-device-train-batch-size 16 --logging-steps 10 --save-steps 100 --model-max-length 512)
fi
exec "$PYTHON" scripts/train_llava.py "${args[@]}" "$@"
