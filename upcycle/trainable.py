"""Which parameters train, decided in one function per recipe stage (the tests assert the exact sets).

- ``mcl``: every FFN of both towers (``mlp.fc1``/``mlp.fc2``, weights and biases); attention, norms, embeddings,
  projections and the logit scale stay frozen (CLIP-MoE's ``lock_except_mlp``).
- ``router``: the routers only (``mlp.gate``), as CLIP-MoE's final stage (``lock_except_gate``).
- ``experts+router``: routers and experts (CLIP-UP's default sparse-upcycling set).
- ``all``: every parameter except the logit scale unless ``learn_temperature``.
- ``ffn``: the FFNs of a dense model, or experts + routers of an MoE model (the dense baseline's set, matching
  the MCL stages' budget).
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["TRAINABLE_SETS", "set_trainable"]

_FFN = re.compile(r"\.mlp\.(fc[12]\.(weight|bias)|experts\.(up|down)_proj(_bias)?)$")
_ROUTER = re.compile(r"\.mlp\.gate\.weight$")
_EXPERTS = re.compile(r"\.mlp\.experts\.(up|down)_proj(_bias)?$")

TRAINABLE_SETS = ("mcl", "router", "experts+router", "all", "ffn")


def _select(name: str, which: str) -> bool:
    if which in ("mcl", "ffn"):
        return bool(_FFN.search(name)) or (which == "ffn" and bool(_ROUTER.search(name)))
    if which == "router":
        return bool(_ROUTER.search(name))
    if which == "experts+router":
        return bool(_EXPERTS.search(name) or _ROUTER.search(name))
    if which == "all":
        return name != "logit_scale"
    raise ValueError(f"unknown trainable set {which!r}; valid: {', '.join(TRAINABLE_SETS)}")


def set_trainable(model: nn.Module, which: str, learn_temperature: bool = False) -> list[str]:
    """Sets ``requires_grad`` for the named set and returns the sorted names of the trainable parameters."""
    names = []
    for name, param in model.named_parameters():
        train = _select(name, which) or (learn_temperature and name == "logit_scale")
        param.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ValueError(f"trainable set {which!r} selects no parameter of {type(model).__name__} "
                         "(a router set needs an MoE model)")
    return sorted(names)
