#!/usr/bin/env bash
# LLaVA-1.5 stage 2 with LoRA on the LM: `clipmoe train-llava --preset finetune-lora-cpu` (add --bits 4 for QLoRA;
# tower and projector stay unquantized). Merge: python scripts/merge_lora.py runs/llava-lora runs/llava-lora-merged
#   bash scripts/finetune_lora.sh                                          # CPU default -> runs/llava-lora
#   bash scripts/finetune_lora.sh --config configs/llava/finetune_lora.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m clipmoe_cli train-llava --preset finetune-lora-cpu "$@"
