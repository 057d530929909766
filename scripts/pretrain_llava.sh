#!/usr/bin/env bash
# LLaVA-1.5 stage 1 (projector only, `plain` template, captions): `clipmoe train-llava --preset pretrain-cpu`.
#   bash scripts/pretrain_llava.sh                                         # CPU default -> runs/llava-pretrain
#   bash scripts/pretrain_llava.sh --config configs/llava/pretrain.yaml    # LLaVA-1.5 settings (docs/llava.md)
# Extra flags override the preset (`python -m clipmoe_cli train-llava --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m clipmoe_cli train-llava --preset pretrain-cpu "$@"
