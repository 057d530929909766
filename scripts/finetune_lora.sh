#!/usr/bin/env bash
# LLaVA-1.5 stage 2 with LoRA on the language model (r 128, alpha 256; LoRA lr 2e-4, projector lr 2e-5).
# Runs stage 1 first when its output is missing. LLAVA_BITS=4 (or 8) for QLoRA (bitsandbytes; tower and
# projector stay unquantized). Merge afterwards: python scripts/merge_lora.py runs/llava-lora runs/llava-lora-merged
#
#   bash scripts/finetune_lora.sh              # CPU default -> runs/llava-lora
#   LLAVA_BITS=4 bash scripts/finetune_lora.sh # QLoRA
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
PRETRAIN_OUT=${LLAVA_PRETRAIN_OUT:-runs/llava-pretrain}

if [[ ! -f "$PRETRAIN_OUT/config.json" ]]; then
  echo "[finetune_lora.sh] $PRETRAIN_OUT missing: running stage 1 first"
  LLAVA_DATA="${LLAVA_PRETRAIN_DATA:-}" LLAVA_IMAGES="${LLAVA_PRETRAIN_IMAGES:-}" bash scripts/pretrain_llava.sh
fi

args=(--stage finetune --lora --bits "${LLAVA_BITS:-16}" --model "$PRETRAIN_OUT"
      --output-dir "${LLAVA_LORA_OUT:-runs/llava-lora}")
[[ -n "${LLAVA_DATA:-}" ]] && args+=(--data-path "$LLAVA_DATA")
[[ -n "${LLAVA_IMAGES:-}" ]] && args+=(--image-folder "$LLAVA_IMAGES")
if [[ -n "${LLAVA_FULL:-}" ]]; then
  args+=(--config configs/llava/finetune_lora.yaml)
else
  # tiny CPU default: one BLAS thread is faster for these small matrices on a busy 2-core machine, and one
  # DataLoader worker overlaps image decoding with the step
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  args+=(--dataloader-num-workers 1)
  # CPU default: tiny LM, so a small rank (r 16, alpha 32) and 2 epochs; LoRA lr 2e-4, projector lr 2e-5
  args+=(--per-device-train-batch-size 16 --lora-r 16 --lora-alpha 32 --num-train-epochs 2 --logging-steps 10
         --save-steps 200 --model-max-length 512)
fi
exec "$PYTHON" scripts/train_llava.py "${args[@]}" "$@"
