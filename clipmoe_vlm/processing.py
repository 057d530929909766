"""CLIP's image preprocessing and the open_clip tokenizer: what every encoder job (training, evaluation, routing
analysis) feeds a CLIP or CLIP-MoE with."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "clip_image_transform", "open_clip_tokenizer"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_clip_tokenizer(context_length: int = 77) -> Callable[[list[str]], torch.LongTensor]:
    """open_clip's ``SimpleTokenizer`` with the OpenAI BPE vocabulary (shipped inside open_clip_torch, so offline).

    Calling it on a list of B captions returns a ``(B, context_length)`` LongTensor: start token 49406, the BPE
    ids, end token 49407, zero padding. Longer captions are truncated and keep 49407 as their last token, as
    ``open_clip.tokenize``. CLIP uses 77; CLIP-MoE's Long-CLIP text tower uses 248.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
    from open_clip.tokenizer import SimpleTokenizer  # heavy import (open_clip pulls timm): only when needed

    return SimpleTokenizer(context_length=context_length)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def clip_image_transform(image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                         std: Sequence[float] = OPENAI_CLIP_STD) -> Callable[[Image.Image], torch.Tensor]:
    """CLIP's eval preprocessing, which CLIP-MoE also trains with (no augmentation): RGB, bicubic resize of the
    shortest side to ``image_size``, center crop to ``image_size`` squared, to a [0, 1] tensor, normalise.

    Converting to RGB comes first (open_clip converts after resizing), so palette images are resized in RGB
    rather than with the nearest-neighbour filter PIL uses for palette images.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return transforms.Compose([
        _to_rgb,
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(tuple(mean), tuple(std)),
    ])

