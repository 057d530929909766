"""Recipes that turn a dense CLIP into a CLIP-MoE, and the checked conversions they stand on."""

# `import clipmoe_vlm` (which this triggers first) sets the OpenMP wait policy before torch loads.
from clipmoe_vlm.convert import (
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
