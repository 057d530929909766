"""clipmoe-vlm: sparse Mixture-of-Experts CLIP (CLIP-MoE) for Hugging Face transformers and LLaVA-1.5.

Importing the package registers the CLIP-MoE configs and models with transformers' ``AutoConfig`` and
``AutoModel``, so ``AutoModel.from_pretrained(folder)`` and ``LlavaForConditionalGeneration.from_pretrained``
rebuild CLIP-MoE towers from their ``config.json``.
"""

import os as _os

# OpenMP threads that spin while waiting make PyTorch on a busy CPU many times slower (measured: 12x for small
# matmuls when another process competes for the cores; docs/performance.md). Only a default: a value the user
# set wins, and it acts only if this runs before torch is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transformers import AutoConfig, AutoModel

from .configuration_clip_moe import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from .modeling_clip_moe import (
    CLIPMoEModel,
    CLIPMoEOutput,
    CLIPMoETextModel,
    CLIPMoETowerOutput,
    CLIPMoEVisionModel,
)
from .moe import CLIPMoEExperts, CLIPMoERouter, CLIPMoESparseBlock

__version__ = "0.1.0"


def _register() -> None:
    for config_cls, model_cls in (
        (CLIPMoEConfig, CLIPMoEModel),
        (CLIPMoEVisionConfig, CLIPMoEVisionModel),
        (CLIPMoETextConfig, CLIPMoETextModel),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)


_register()

__all__ = [
    "CLIPMoEConfig",
    "CLIPMoEExperts",
    "CLIPMoEModel",
    "CLIPMoEOutput",
    "CLIPMoERouter",
    "CLIPMoESparseBlock",
    "CLIPMoETextConfig",
    "CLIPMoETextModel",
    "CLIPMoETowerOutput",
    "CLIPMoEVisionConfig",
    "CLIPMoEVisionModel",
]
