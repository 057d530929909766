"""Which parameters of a LLaVA model train: parameter groups, the LoRA target pattern, per-stage trainable sets.

These are the rules both `clipmoe_vlm.llava.lora` (LoRA targets, checking where adapters landed) and
`clipmoe_vlm.llava.trainer` (per-group learning rates) need; keeping them here lets the two modules depend on this
one instead of on each other. Only ``re`` and ``torch`` are imported, no transformers / peft.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = [
    "LM_LORA_TARGETS",
    "configure_trainable",
    "parameter_group_of",
    "summarize_trainable",
    "tower_layers_in_use",
    "trainable_parameter_names",
]

# Linear layers of the language model that LoRA adapts, as a regex anchored to the language model's module path,
# so no vision-tower or projector module can match (LLaVA's leaf-name list also matched CLIP's q/k/v_proj).
LM_LORA_TARGETS = (r"(.*\.)?model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
                   r"|c_attn|c_proj|c_fc|query_key_value|dense|dense_h_to_4h|dense_4h_to_h|fc1|fc2|w1|w2|w3)")

_PROJECTOR = re.compile(r"(^|\.)model\.multi_modal_projector\.")
_ROUTER = re.compile(r"(^|\.)model\.vision_tower\..*\.mlp\.gate\.weight$")
_EXPERTS = re.compile(r"(^|\.)model\.vision_tower\..*\.mlp\.experts\.")
_TOWER_LAYER = re.compile(r"(^|\.)model\.vision_tower\..*\.layers\.(\d+)\.")
_LM = re.compile(r"(^|\.)(model\.language_model\.|lm_head\.)")
_LORA = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def parameter_group_of(name: str) -> str:
    """``projector``, ``router``, ``experts``, ``lora``, ``language_model`` or ``vision_tower`` for a parameter name
    of a (possibly peft-wrapped) LLaVA model."""
    if _LORA.search(name):
        return "lora"
    if _PROJECTOR.search(name):
        return "projector"
    if _ROUTER.search(name):
        return "router"
    if _EXPERTS.search(name):
        return "experts"
    if _LM.search(name):
        return "language_model"
    return "vision_tower"


def tower_layers_in_use(config: Any) -> int | None:
    """How many of the vision tower's layers, from the first, compute the features the projector reads (None when
    ``config``, a LLaVA config, does not say). LLaVA-1.5 reads the penultimate layer's output
    (``vision_feature_layer -2``): the last layer runs, but nothing depends on it, so its routers and experts get no
    gradient and its routing statistics say nothing about the features used."""
    selected = getattr(config, "vision_feature_layer", None)
    vision = getattr(config, "vision_config", None)
    if selected is None or vision is None:
        return None
    layers = vision.num_hidden_layers
    # hidden_states[i] is the output of layer i - 1 (hidden_states[0]: the embeddings)
    return max(index if index >= 0 else layers + 1 + index
               for index in (selected if isinstance(selected, (list, tuple)) else [selected]))


def configure_trainable(model: nn.Module, stage: str, *, lora: bool = False, train_router: bool = False,
                        train_experts: bool = False) -> list[str]:
    """Set ``requires_grad`` for a stage and return the sorted names of the trainable parameters.

    - ``pretrain``: the projector only;
    - ``finetune``: projector + language model (embeddings, layers, norm, ``lm_head``);
    - ``finetune`` with ``lora=True`` (the model already peft-wrapped): projector + the LoRA matrices (the base
      LM stays frozen);
    - ``train_router`` / ``train_experts`` (any stage) add the vision tower's MoE routers / experts, in the layers
      whose output reaches the projector (`tower_layers_in_use`; the others would get no gradient).

    Everything else, the rest of the vision tower included, is frozen (``requires_grad=False``; nothing is
    wrapped in ``no_grad``, so gradients still flow through a frozen tower to trainable routers).

    Raises:
        ValueError: an unknown stage, LoRA in the pretrain stage, router/expert training on a tower without MoE
            layers.
    """
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
    if lora and stage == "pretrain":
        raise ValueError("LoRA applies to the finetune stage (the pretrain stage trains the projector only)")
    wanted = {"projector"}
    if stage == "finetune":
        wanted.add("lora" if lora else "language_model")
    if train_router:
        wanted.add("router")
    if train_experts:
        wanted.add("experts")
    in_use = tower_layers_in_use(getattr(model, "config", None))
    names = []
    groups_seen, groups_trained = set(), set()
    for name, parameter in model.named_parameters():
        group = parameter_group_of(name)
        groups_seen.add(group)
        train = group in wanted
        if train and not parameter.is_floating_point():  # quantized weights
            train = False
        layer = _TOWER_LAYER.search(name) if group in ("router", "experts") else None
        if train and layer and in_use is not None:
            train = int(layer.group(2)) < in_use
        parameter.requires_grad_(train)
        if train:
            names.append(name)
            groups_trained.add(group)
    for needed, flag in (("router", "train_router"), ("experts", "train_experts")):
        if needed in wanted and needed not in groups_seen:
            raise ValueError(f"--{flag.replace('_', '-')}: the vision tower has no MoE {needed} parameters")
        if needed in wanted and needed not in groups_trained:
            raise ValueError(f"--{flag.replace('_', '-')}: the vision tower's MoE layers all come after the layer "
                             f"the projector reads (--vision-feature-layer {model.config.vision_feature_layer})")
    if lora and "lora" not in groups_seen:
        raise ValueError("lora=True but the model has no LoRA parameters (wrap it with peft first)")
    return sorted(names)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Sorted names of the parameters with ``requires_grad`` (what `configure_trainable` left trainable)."""
    return sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)


def summarize_trainable(model: nn.Module) -> dict[str, Any]:
    """Trainable parameter counts per group (for logs and the model card)."""
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            group = parameter_group_of(name)
            counts[group] = counts.get(group, 0) + parameter.numel()
    return counts
