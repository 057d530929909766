#!/usr/bin/env bash
# LLaVA-1.5 stage 2 (projector + LM, `vicuna_v1`): `clipmoe train-llava --preset finetune-cpu`; on the embedded
# Shapes data it runs stage 1 first when the --model folder (default runs/llava-pretrain) is missing.
#   bash scripts/finetune_llava.sh                                         # CPU default -> runs/llava-finetune
#   bash scripts/finetune_llava.sh --train-router                          # also tune the CLIP-MoE routers
#   bash scripts/finetune_llava.sh --config configs/llava/finetune.yaml    # LLaVA-1.5 settings (docs/llava.md)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m clipmoe_cli train-llava --preset finetune-cpu "$@"
