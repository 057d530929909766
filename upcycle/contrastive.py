"""Symmetric InfoNCE (CLIP) loss over the global batch, with label smoothing and an injectable gather.

``loss = (CE(s * I T^T, y) + CE(s * T I^T, y)) / 2`` over the features of the *global* batch (all processes),
``s`` the logit scale (1/temperature), ``y`` the diagonal, with optional label smoothing (CLIP-MoE: 0.1).

Every process computes the loss of the whole global batch from features gathered *with gradients*; the
backward of the gather sends each process the gradient of its own features, and DDP's averaging of parameter
gradients then yields exactly the gradient of the global loss (open_clip's ``gather_with_grad`` scheme).
open_clip's ``ClipLoss`` is not used directly because it has no label smoothing and its gather needs equal
batch sizes on every process, while a batch here may be short by the images that failed to decode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["clip_contrastive_loss", "gather_rows", "gather_with_grad", "no_gather"]

Gather = Callable[[torch.Tensor], torch.Tensor]


def no_gather(features: torch.Tensor) -> torch.Tensor:
    """Single process: the local batch is the global batch."""
    return features


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenates ``features`` (B_r, D) of every process in rank order, keeping gradients; B_r may differ."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size()
    size = torch.tensor([features.shape[0]], device=features.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = F.pad(features, (0, 0, 0, max(sizes) - features.shape[0]))
    gathered = all_gather(padded)  # differentiable
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)


def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                          label_smoothing: float = 0.0, gather: Gather = no_gather,
                          normalize: bool = True) -> torch.Tensor:
    """The CLIP loss of the global batch. ``logit_scale`` is the multiplier (``exp`` of a learned log-scale, or
    a fixed 1/τ); features are L2-normalised here unless ``normalize=False``."""
    if normalize:
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
    all_images = gather(image_features)
    all_texts = gather(text_features)
    logits = logit_scale * all_images @ all_texts.t()  # (N, N) image -> text
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.t(), labels, label_smoothing=label_smoothing)) / 2


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' rows concatenated in rank order, without gradient; unlike `gather_with_grad`, ranks may
    hold different numbers of rows (the last shard of an evaluation)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]])
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, longest - tensor.shape[0]))
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])
