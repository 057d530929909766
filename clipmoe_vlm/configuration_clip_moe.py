"""Configurations of the CLIP-MoE towers and of the two-tower CLIP-MoE model.

The configs extend transformers' CLIP configs with the fields of a sparse FFN block. They keep the CLIP
vocabulary (`hidden_size`, `num_hidden_layers`, ...) and add the MoE fields under the names that the CLIP-MoE,
Mixtral and Switch/V-MoE code bases use:

- ``num_experts`` (E) and ``top_k`` (k): experts per MoE layer and experts each token is sent to;
- ``moe_layers``: which encoder layers (0-based) are MoE; ``None`` means every layer (the CLIP-MoE default);
- ``norm_topk_prob``: renormalise the k selected router probabilities to sum to one (CLIP-MoE, Mixtral) or
  use the raw softmax gates as combine weights (V-MoE, LIMoE);
- ``router_jitter_noise``: standard deviation of Gaussian noise added to the router logits in training
  (V-MoE uses 1/E); 0 disables it;
- ``expert_dropout``: dropout between the expert's activation and its output projection (CLIP-MoE: 0.1);
- ``capacity_factor`` and ``batch_priority_routing``: V-MoE style expert capacity
  ``ceil(k * tokens * capacity_factor / E)`` with token dropping, optionally filled in order of the tokens'
  top-1 gate value (batch priority routing); ``None`` keeps every token;
- ``router_aux_loss_coef``, ``router_z_loss_coef``, ``router_local_entropy_coef``, ``router_global_entropy_coef``
  (with ``router_global_entropy_min_experts``): weights of the router losses that each tower adds to the
  ``aux_loss`` of its output (load balancing, z-loss, LIMoE's local and global entropy);
- ``output_router_logits``: whether a forward returns the router logits (and so ``aux_loss``) when the call does
  not say; False for a tower (as Mixtral's config), True for the two-tower `CLIPMoEConfig`, whose forward has
  always returned them.

The experts kernel is transformers' ``experts_implementation`` (``"eager"``, ``"grouped_mm"``, ``"batched_mm"``;
when unset, eager on a machine without CUDA and grouped_mm with CUDA): a constructor keyword of every config here
(``CLIPMoEConfig(experts_implementation=...)`` sets both towers; a dict such as ``{"vision_config": "eager"}`` sets
one) or of ``from_pretrained``. Like
``attn_implementation`` it is not written to ``config.json``.
"""

from __future__ import annotations

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

__all__ = ["CLIPMoEConfig", "CLIPMoETextConfig", "CLIPMoEVisionConfig", "MOE_CONFIG_FIELDS", "MoETowerFields"]

def _validate_moe_fields(config) -> None:
    """Checks the MoE fields of a tower config; raises ValueError naming the field at fault."""
    name = type(config).__name__
    if config.num_experts < 1:
        raise ValueError(f"{name}.num_experts must be >= 1, got {config.num_experts}")
    if not 1 <= config.top_k <= config.num_experts:
        raise ValueError(
            f"{name}.top_k must be between 1 and num_experts={config.num_experts}, got {config.top_k}"
        )
    if config.moe_layers is not None:
        layers = list(config.moe_layers)
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < config.num_hidden_layers]
        if bad:
            raise ValueError(
                f"{name}.moe_layers has indices outside range({config.num_hidden_layers}): {bad}"
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"{name}.moe_layers has duplicate indices: {layers}")
    if config.capacity_factor is not None and config.capacity_factor <= 0:
        raise ValueError(f"{name}.capacity_factor must be > 0 or None, got {config.capacity_factor}")
    if not 0.0 <= config.expert_dropout < 1.0:
        raise ValueError(f"{name}.expert_dropout must be in [0, 1), got {config.expert_dropout}")
    for field in ("router_jitter_noise", "router_aux_loss_coef", "router_z_loss_coef", "router_local_entropy_coef",
                  "router_global_entropy_coef"):
        if getattr(config, field) < 0:
            raise ValueError(f"{name}.{field} must be >= 0, got {getattr(config, field)}")


@dataclasses.dataclass(repr=False)
class MoETowerFields:
    """The MoE fields of both tower configs, declared once (the configs inherit them), and their helpers.

    The router loss coefficients are read by the model's head, which adds the weighted losses to ``aux_loss``:
    load balancing (``router_aux_loss_coef``), ST-MoE's z-loss, LIMoE's local entropy and its global entropy
    (thresholded at ``log(router_global_entropy_min_experts)`` when that is set)."""

    num_experts: int = 4
    top_k: int = 2
    moe_layers: list[int] | None = None
    norm_topk_prob: bool = True
    router_jitter_noise: float = 0.0
    expert_dropout: float = 0.0
    capacity_factor: float | None = None
    batch_priority_routing: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_local_entropy_coef: float = 0.0
    router_global_entropy_coef: float = 0.0
    router_global_entropy_min_experts: float | None = None
    output_router_logits: bool = False

    def moe_layer_indices(self) -> list[int]:
        """The sorted indices of the MoE layers of this tower."""
        if self.moe_layers is None:
            return list(range(self.num_hidden_layers))
        return sorted(int(i) for i in self.moe_layers)

    def is_moe_layer(self, index: int) -> bool:
        return index in self.moe_layer_indices()


# The MoE fields and their defaults (the CLI and the conversions check option names against it).
MOE_CONFIG_FIELDS: dict[str, object] = {f.name: f.default for f in dataclasses.fields(MoETowerFields)}


@strict
class CLIPMoEVisionConfig(MoETowerFields, CLIPVisionConfig):
    """`CLIPVisionConfig` plus the MoE fields (see the module docstring)."""

    model_type = "clip_moe_vision_model"
    base_config_key = "vision_config"

    def validate_architecture(self):
        super().validate_architecture()
        _validate_moe_fields(self)


@strict
class CLIPMoETextConfig(MoETowerFields, CLIPTextConfig):
    """`CLIPTextConfig` plus the MoE fields (see the module docstring)."""

    model_type = "clip_moe_text_model"
    base_config_key = "text_config"

    def validate_architecture(self):
        super().validate_architecture()
        _validate_moe_fields(self)


@strict
class CLIPMoEConfig(CLIPConfig):
    """Two-tower CLIP-MoE config.

    ``upcycling_info`` records where the checkpoint came from (source model, format, recipe, data, steps), so
    that a folder describes itself.
    """

    model_type = "clip_moe"
    sub_configs_defaults = {
        "vision_config": CLIPMoEVisionConfig,
        "text_config": CLIPMoETextConfig,
    }

    upcycling_info: dict | None = None
    output_router_logits: bool = True
