"""Recipes that turn a dense CLIP into a CLIP-MoE, and the checked conversions they stand on."""

import os as _os

# OpenMP threads that spin while waiting make PyTorch on a busy CPU many times slower (measured: 12x for small
# matmuls when another process competes for the cores; docs/performance.md). Only a default: a value the user
# set wins, and it acts only if this runs before torch is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .convert import (
    SUPPORTED_SOURCES,
    CheckpointMismatchError,
    load_official_clipmoe,
    load_state_dict_checked,
    moe_config_from_dense,
    open_clip_to_hf,
    openai_layout_to_hf,
    parse_moe_layers,
    sparse_upcycle,
    upcycle_state_dict,
)

__all__ = [
    "SUPPORTED_SOURCES",
    "CheckpointMismatchError",
    "load_official_clipmoe",
    "load_state_dict_checked",
    "moe_config_from_dense",
    "open_clip_to_hf",
    "openai_layout_to_hf",
    "parse_moe_layers",
    "sparse_upcycle",
    "upcycle_state_dict",
]
