"""What the benchmarks run: the ViT sizes, the configs and models built from them (random weights, no
downloads), and the CPU autocast context of a precision."""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

from clipmoe_vlm import CLIPMoEVisionConfig
from clipmoe_vlm.convert import sparse_upcycle

__all__ = ["VIT_SIZES", "clip_moe", "cpu_autocast", "vision_configs", "vit_clip_config"]

# (name, tokens per image, hidden, intermediate, image size, patch, layers, heads)
VIT_SIZES = {
    "vit-b16": dict(seq=197, hidden=768, intermediate=3072, image_size=224, patch_size=16, layers=12, heads=12),
    "vit-l14-336": dict(seq=577, hidden=1024, intermediate=4096, image_size=336, patch_size=14, layers=24,
                        heads=16),
    "tiny": dict(seq=65, hidden=128, intermediate=512, image_size=64, patch_size=8, layers=2, heads=4),
}


def cpu_autocast(dtype: str):
    """``torch.autocast`` on the CPU to bfloat16 for ``"bf16"``; autocast off for ``"fp32"``."""
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def vision_configs(size: str, layers: int | None) -> tuple[CLIPVisionConfig, CLIPMoEVisionConfig]:
    """A dense and a CLIP-MoE (E=4, top-2) vision config of ``size``, ``layers`` deep (None: the full depth)."""
    spec = VIT_SIZES[size]
    common = dict(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                  num_hidden_layers=layers or spec["layers"], num_attention_heads=spec["heads"],
                  image_size=spec["image_size"], patch_size=spec["patch_size"])
    return CLIPVisionConfig(**common), CLIPMoEVisionConfig(**common, num_experts=4, top_k=2)


def vit_clip_config(size: str, layers: int | None = None, text_layers: int | None = None) -> CLIPConfig:
    """A CLIPConfig whose vision tower is ``size`` (VIT_SIZES) and text tower CLIP's 12-layer 512-wide (77
    tokens), both depths optionally cut."""
    spec = VIT_SIZES[size]
    text_width = 512 if size != "tiny" else 128
    return CLIPConfig(
        vision_config=dict(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                           num_hidden_layers=layers or spec["layers"], num_attention_heads=spec["heads"],
                           image_size=spec["image_size"], patch_size=spec["patch_size"]),
        text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=text_layers or (12 if size != "tiny" else 2),
                         num_attention_heads=max(1, text_width // 64), max_position_embeddings=77,
                         eos_token_id=2),
        projection_dim=512 if size != "tiny" else 128)


def clip_moe(config: CLIPConfig, num_experts: int = 4, top_k: int = 2):
    """A CLIP-MoE sparse-upcycled from a randomly initialised (seed 0) CLIP of ``config``."""
    torch.manual_seed(0)
    return sparse_upcycle(CLIPModel(config), num_experts=num_experts, top_k=top_k)
