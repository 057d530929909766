"""Auxiliary losses of MoE routers, as plain functions of the router logits.

Every function takes ``router_logits``: a tuple (one entry per MoE layer) of (T, E) tensors, or one stacked
(L, T, E) / (L*T, E) tensor, where T = batch * sequence, and an optional ``attention_mask`` (B, S) that marks
the real tokens (1) against padding (0); T must equal B * S then. Probabilities are computed in fp32.

- `load_balancing_loss`: Switch/Mixtral load balancing ``E * sum_{j,e} f_{j,e} * P_e`` with the statistics
  pooled over all layers of a tower (CLIP-MoE's code, the old transformers Mixtral function). f_{j,e} is the
  fraction of tokens whose j-th choice is expert e and P_e the mean router probability of e. Its minimum,
  at uniform routing, is k (the number of experts per token).
- `router_z_loss`: ST-MoE's ``mean(logsumexp(logits)^2)``.
- `local_entropy_loss`: LIMoE's local entropy, the mean per-token routing entropy (minimised: confident
  routing), averaged over layers.
- `global_entropy_loss`: LIMoE's global entropy of the mean routing distribution, ``-H(mean_i p_i)``, or the
  thresholded ``max(0, log S - H(mean_i p_i))`` with a soft minimum of S experts; averaged over layers. Apply it
  per modality (call it once with the image tower's logits and once with the text tower's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "expert_load",
    "global_entropy_loss",
    "load_balancing_loss",
    "local_entropy_loss",
    "router_z_loss",
]

RouterLogits = Sequence[torch.Tensor] | torch.Tensor


def _stack(router_logits: RouterLogits) -> torch.Tensor:
    """(L, T, E) fp32 from a tuple of (T, E) or an (L, T, E) tensor."""
    if isinstance(router_logits, torch.Tensor):
        logits = router_logits if router_logits.dim() == 3 else router_logits[None]
    else:
        if len(router_logits) == 0:
            raise ValueError("router_logits is empty: the model has no MoE layer or did not record them")
        logits = torch.stack([r.reshape(-1, r.shape[-1]) for r in router_logits])
    return logits.float()


def _token_weights(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(T,) weights that sum to one over the real tokens."""
    num_tokens = logits.shape[1]
    if attention_mask is None:
        return logits.new_full((num_tokens,), 1.0 / num_tokens)
    mask = attention_mask.reshape(-1).to(logits.dtype)
    if mask.numel() != num_tokens:
        raise ValueError(
            f"attention_mask has {mask.numel()} positions but the router saw {num_tokens} tokens per layer"
        )
    return mask / mask.sum().clamp_min(1.0)


def load_balancing_loss(router_logits: RouterLogits, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    logits = _stack(router_logits)  # (L, T, E)
    num_experts = logits.shape[-1]
    w = _token_weights(logits, attention_mask)  # (T,)
    probs = logits.softmax(dim=-1)
    selected = probs.topk(top_k, dim=-1).indices  # (L, T, k)
    one_hot = F.one_hot(selected, num_experts).to(probs.dtype)  # (L, T, k, E)
    num_layers = logits.shape[0]
    # Pool over layers: every layer's tokens count equally, weighted by the token mask.
    f = torch.einsum("ltke,t->ke", one_hot, w) / num_layers  # (k, E)
    p = torch.einsum("lte,t->e", probs, w) / num_layers  # (E,)
    return num_experts * (f * p[None]).sum()


def router_z_loss(router_logits: RouterLogits, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    logits = _stack(router_logits)
    w = _token_weights(logits, attention_mask)
    z = torch.logsumexp(logits, dim=-1) ** 2  # (L, T)
    return (z * w).sum(dim=-1).mean()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


def local_entropy_loss(router_logits: RouterLogits, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    logits = _stack(router_logits)
    w = _token_weights(logits, attention_mask)
    h = _entropy(logits.softmax(dim=-1))  # (L, T)
    return (h * w).sum(dim=-1).mean()


def global_entropy_loss(router_logits: RouterLogits, soft_min_experts: float | None = None,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``-H(p_mean)``, or ``max(0, log(soft_min_experts) - H(p_mean))`` when ``soft_min_experts`` is given."""
    logits = _stack(router_logits)
    w = _token_weights(logits, attention_mask)
    mean_probs = torch.einsum("lte,t->le", logits.softmax(dim=-1), w)  # (L, E)
    h = _entropy(mean_probs)  # (L,)
    if soft_min_experts is None:
        return (-h).mean()
    return torch.clamp(math.log(soft_min_experts) - h, min=0.0).mean()


@torch.no_grad()
def expert_load(router_logits: RouterLogits, top_k: int,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(L, E): the fraction of (token, choice) assignments each expert receives in each layer."""
    logits = _stack(router_logits)
    w = _token_weights(logits, attention_mask)
    selected = logits.topk(top_k, dim=-1).indices
    one_hot = F.one_hot(selected, logits.shape[-1]).float()  # (L, T, k, E)
    return torch.einsum("ltke,t->le", one_hot, w) / top_k
