"""Shared fixtures: tiny models built from configs (no downloads), fixed seeds, CPU."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see clipmoe_vlm/__init__.py

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel

import clipmoe_vlm  # noqa: F401  (registers the Auto classes)

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                   patch_size=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
                 max_position_embeddings=16, eos_token_id=98, bos_token_id=97, pad_token_id=0)


@pytest.fixture
def tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(vision_config=dict(TINY_VISION), text_config=dict(TINY_TEXT), projection_dim=16)


@pytest.fixture
def tiny_dense_clip(tiny_clip_config) -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(tiny_clip_config).eval()


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def input_ids() -> torch.Tensor:
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(2))
    ids[:, -1] = 98  # end-of-text
    return ids
