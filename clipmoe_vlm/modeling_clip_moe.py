"""CLIP-MoE models: transformers' CLIP with sparse MoE FFNs in chosen encoder layers.

The classes subclass transformers' CLIP classes and replace only ``encoder.layers[i].mlp`` by
`CLIPMoESparseBlock`, so every dense key keeps its name and meaning; an MoE layer's keys are
``...layers.{i}.mlp.gate.weight`` and ``...layers.{i}.mlp.experts.{up_proj,up_proj_bias,down_proj,down_proj_bias}``
(transformers' experts interface). Folders written before the experts interface (``experts.fc1_weight``,
``fc1_bias``, ``fc2_weight``, ``fc2_bias``) load unchanged through `LEGACY_EXPERT_KEYS`, a conversion mapping
registered with transformers, in a CLIP-MoE folder and in a LLaVA folder with a CLIP-MoE tower alike.

- `CLIPMoEVisionModel`: a drop-in for ``CLIPVisionModel`` (``last_hidden_state``, ``pooler_output``,
  ``hidden_states`` selectable by index as transformers' LLaVA asks for them), plus ``router_logits`` when called
  with ``output_router_logits=True``. It is the vision tower of ``LlavaForConditionalGeneration`` when the LLaVA
  config's ``vision_config`` is a `CLIPMoEVisionConfig`.
- `CLIPMoETextModel`: the same for ``CLIPTextModel``.
- `CLIPMoEModel`: both towers and the projections; ``get_image_features``/``get_text_features``, similarity
  logits, and on its output the router logits of each tower and ``aux_loss`` (each tower's load-balancing and
  z-loss weighted by its config's coefficients).

Every model takes ``experts_implementation`` (``"eager"``, ``"grouped_mm"``, ``"batched_mm"``; unset: eager on a
machine without CUDA, grouped_mm with CUDA) in its config or at ``from_pretrained``, and
``set_experts_implementation`` switches it (see `clipmoe_vlm.moe`).

Router logits: each encoder layer returns ``(hidden_states, router_logits)`` (None for a dense layer) and
transformers' output capturing records index 1 of the layers' outputs, so no module keeps state between calls and
the logits come out of a (reentrant) gradient checkpoint with their gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPModel,
    CLIPOutput,
    CLIPPreTrainedModel,
    CLIPTextEmbeddings,
    CLIPTextModel,
    CLIPVisionEmbeddings,
    CLIPVisionModel,
    image_text_contrastive_loss,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .checkpoint import check_shapes, safetensors_shapes
from .configuration_clip_moe import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig, MoETowerFields
from .losses import global_entropy_loss, load_balancing_loss, local_entropy_loss, router_z_loss
from .moe import (
    LEGACY_EXPERT_KEYS,
    CLIPMoEExperts,
    CLIPMoERouter,
    CLIPMoESparseBlock,
    default_experts_implementation,
    rename_legacy_expert_key,
)

__all__ = [
    "CLIPMoEModel",
    "CLIPMoEOutput",
    "CLIPMoEPreTrainedModel",
    "CLIPMoETextModel",
    "CLIPMoETowerOutput",
    "CLIPMoEVisionModel",
    "tower_aux_loss",
]


@dataclass
class CLIPMoETowerOutput(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` plus ``router_logits``: one (batch*seq, num_experts) tensor per MoE layer,
    present when the tower is called with ``output_router_logits=True``, and ``aux_loss``, the tower's weighted
    router losses computed from them (`tower_aux_loss`)."""

    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class CLIPMoEOutput(CLIPOutput):
    """``CLIPOutput`` plus the routers' outputs of both towers.

    ``aux_loss`` is the weighted sum of the towers' load-balancing and z-losses (see `tower_aux_loss`);
    ``loss`` (with ``return_loss=True``) is the contrastive loss plus ``aux_loss``.
    """

    aux_loss: torch.Tensor | None = None
    image_router_logits: tuple[torch.Tensor, ...] | None = None
    text_router_logits: tuple[torch.Tensor, ...] | None = None


def _register_legacy_expert_keys() -> None:
    """Adds `LEGACY_EXPERT_KEYS` to transformers' ``legacy`` conversion mapping, the one ``from_pretrained`` applies
    to every model (so also to the CLIP-MoE tower inside a LLaVA) and a fresh model's ``save_pretrained`` does not
    reverse: new folders get the new names. (A mapping registered under a model type would be reversed when a
    model built in memory is saved, writing the old names.) As transformers does for its own legacy renamings, a
    model loaded from an old folder is saved in that folder's layout unless ``save_original_format=False``."""
    legacy = get_checkpoint_conversion_mapping("legacy") or []
    if any(t.source_patterns == [old] for t in legacy for old in LEGACY_EXPERT_KEYS):
        return
    # A pattern ending in a letter or digit matches up to a name boundary, so ``fc1_weight`` never matches a longer
    # name, and in reverse (saving) ``up_proj`` never matches ``up_proj_bias``.
    ours = [WeightRenaming(source_patterns=old, target_patterns=new) for old, new in LEGACY_EXPERT_KEYS.items()]
    register_checkpoint_conversion_mapping("legacy", legacy + ours, overwrite=True)


_register_legacy_expert_keys()


def _let_llava_choose_experts_implementation() -> None:
    """Lets ``experts_implementation="grouped_mm"`` (``from_pretrained``, ``set_experts_implementation``) reach the
    CLIP-MoE tower of transformers' LLaVA. transformers refuses an explicit ``"grouped_mm"`` for a model whose
    modeling file has no ``@use_experts_implementation``: LLaVA's own classes, and a dense language model (Llama).
    Two narrow changes: LLaVA's classes say they can set the experts implementation (they hand it to their
    sub-models), and a LLaVA config whose vision config is a CLIP-MoE one gives a plain ``"grouped_mm"`` to itself
    and its vision config and resets its text config to its default (``grouped_mm`` where the language model has
    experts, else eager). Any other value, and any other LLaVA, goes through transformers unchanged."""
    from transformers.models.llava import configuration_llava, modeling_llava

    classes = [modeling_llava.LlavaPreTrainedModel]
    while classes:  # transformers caches its source-code check per class
        cls = classes.pop()
        cls._can_set_experts_implementation_cached_value = True
        classes += cls.__subclasses__()
    config_cls = configuration_llava.LlavaConfig
    if getattr(config_cls, "_clipmoe_routes_grouped_mm", False):
        return
    base = PreTrainedConfig._experts_implementation

    def set_experts_implementation(self, value):
        if value == "grouped_mm" and isinstance(getattr(self, "vision_config", None), MoETowerFields):
            value = {"": value, "vision_config": value, "text_config": None}
        base.fset(self, value)

    config_cls._experts_implementation = property(base.fget, set_experts_implementation)
    config_cls._clipmoe_routes_grouped_mm = True


_let_llava_choose_experts_implementation()


class CLIPMoEEncoderLayer(CLIPEncoderLayer):
    """A CLIP encoder layer whose MLP is sparse when ``layer_idx`` is one of the config's MoE layers.

    Returns ``(hidden_states, router_logits)``, ``router_logits`` None in a dense layer: returned rather than
    hooked inside, the logits leave a gradient checkpoint as its outputs, with their gradient."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config)
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = CLIPMoESparseBlock(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states),
                                          attention_mask=attention_mask, **kwargs)
        hidden_states = residual + hidden_states
        router_logits = None
        if self.is_moe:
            mlp_out, router_logits = self.mlp(self.layer_norm2(hidden_states))
        else:
            mlp_out = self.mlp(self.layer_norm2(hidden_states))
        return hidden_states + mlp_out, router_logits


class CLIPMoEEncoder(CLIPEncoder):
    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        self.layers = nn.ModuleList([CLIPMoEEncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutput:
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states, _ = layer(hidden_states, attention_mask, **kwargs)  # positional: reentrant checkpointing
        return BaseModelOutput(last_hidden_state=hidden_states)


# torch's grouped_mm rejects weights and activations whose rows are not a multiple of 16 bytes ("strides should be
# multiple of 16 bytes"): 4 values in fp32, 8 in bf16/fp16. The dtype is not known when the kernel is chosen, so
# both widths of an MoE tower must be multiples of 8 (every released CLIP's are).
GROUPED_MM_WIDTH_MULTIPLE = 8


class CLIPMoEPreTrainedModel(CLIPPreTrainedModel):
    """Weight init and output capture shared by the CLIP-MoE models."""

    config: CLIPMoEConfig
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPMoEEncoderLayer", "CLIPVisionEmbeddings"]
    _can_record_outputs = {
        "hidden_states": CLIPEncoderLayer,
        "attentions": CLIPAttention,
        "router_logits": OutputRecorder(CLIPMoEEncoderLayer, index=1),
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for the decorator in the model's own module; the experts live in clipmoe_vlm.moe
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """transformers' check of the requested kernel; none requested: `default_experts_implementation` (where that
        is grouped_mm, transformers' own default path, which falls back to eager for widths grouped_mm refuses)."""
        if requested_experts is None and default_experts_implementation() == "eager":
            return "eager"
        return super().get_correct_experts_implementation(requested_experts)

    def _grouped_mm_can_dispatch(self) -> bool:
        """transformers asks this before using ``grouped_mm``: an error here makes the default fall back to eager and
        an explicit ``experts_implementation="grouped_mm"`` fail with this message, before any forward."""
        super()._grouped_mm_can_dispatch()
        towers = [("config", self.config)] + [(name, getattr(self.config, name, None))
                                             for name in ("vision_config", "text_config")]
        for name, config in towers:
            if not isinstance(config, MoETowerFields):
                continue
            for field in ("hidden_size", "intermediate_size"):
                width = getattr(config, field)
                if width % GROUPED_MM_WIDTH_MULTIPLE:
                    raise ValueError(
                        f"experts_implementation='grouped_mm' needs {name}.{field} to be a multiple of "
                        f"{GROUPED_MM_WIDTH_MULTIPLE} (torch's grouped_mm takes only 16-byte rows, 8 values in "
                        f"bf16), but it is {width}; use experts_implementation='eager' or 'batched_mm'")
        return True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained``; a local folder is first checked against its config, so that an expert
        count or shape that disagrees fails with `CheckpointMismatchError` naming the key (transformers would
        only log a report and raise a generic error)."""
        path = Path(str(pretrained_model_name_or_path))
        if path.is_dir() and not kwargs.get("ignore_mismatched_sizes"):
            found = safetensors_shapes(path)
            if found is not None:
                config = kwargs.get("config")
                if not isinstance(config, PreTrainedConfig):
                    config = cls.config_class.from_pretrained(path)
                with torch.device("meta"):
                    expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
                found = {rename_legacy_expert_key(k): v for k, v in found.items()}
                check_shapes(expected, {k: v for k, v in found.items() if k in expected or "mlp" in k},
                             source=str(path / "model.safetensors"), require_all=False)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, CLIPMoERouter):
            # the official CLIP-MoE gate is a default nn.Linear: kaiming-uniform (a=sqrt(5)), U(+-1/sqrt(hidden))
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, CLIPMoEExperts):
            cfg = self._tower_config_of(module)
            fc1_std = (2 * cfg.hidden_size) ** -0.5 * factor  # as transformers' CLIPMLP
            fc2_std = (cfg.hidden_size**-0.5) * ((2 * cfg.num_hidden_layers) ** -0.5) * factor
            init.normal_(module.up_proj, std=fc1_std)
            init.normal_(module.down_proj, std=fc2_std)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)

    def _tower_config_of(self, module: nn.Module):
        if isinstance(self.config, CLIPMoEConfig):
            for tower in (getattr(self, "vision_model", None), getattr(self, "text_model", None)):
                if tower is not None and any(m is module for m in tower.modules()):
                    return tower.config
        return self.config


class CLIPMoEVisionModel(CLIPMoEPreTrainedModel, CLIPVisionModel):
    """``CLIPVisionModel`` with sparse MoE FFNs (see the module docstring)."""

    config: CLIPMoEVisionConfig
    config_class = CLIPMoEVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: CLIPMoEVisionConfig):
        CLIPPreTrainedModel.__init__(self, config)
        embed_dim = config.hidden_size
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.encoder = CLIPMoEEncoder(config)
        self.post_layernorm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool | None = False,
                **kwargs) -> CLIPMoETowerOutput:
        return _with_aux_loss(self._encode(pixel_values, interpolate_pos_encoding, **kwargs), self.config)

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def _encode(self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool | None = False,
                **kwargs) -> CLIPMoETowerOutput:
        if pixel_values is None:
            raise ValueError("CLIPMoEVisionModel needs pixel_values")
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        last_hidden_state = self.encoder(inputs_embeds=hidden_states, **kwargs).last_hidden_state
        pooled_output = self.post_layernorm(last_hidden_state[:, 0, :])
        return CLIPMoETowerOutput(last_hidden_state=last_hidden_state, pooler_output=pooled_output)


class CLIPMoETextModel(CLIPMoEPreTrainedModel, CLIPTextModel):
    """``CLIPTextModel`` with sparse MoE FFNs (see the module docstring)."""

    config: CLIPMoETextConfig
    config_class = CLIPMoETextConfig
    input_modalities = ("text",)

    def __init__(self, config: CLIPMoETextConfig):
        CLIPPreTrainedModel.__init__(self, config)
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPMoEEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.eos_token_id = config.eos_token_id
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> CLIPMoETowerOutput:
        out = self._encode(input_ids, attention_mask, position_ids, **kwargs)
        return _with_aux_loss(out, self.config, attention_mask)

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def _encode(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> CLIPMoETowerOutput:
        if input_ids is None:
            raise ValueError("CLIPMoETextModel needs input_ids")
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                  cache=None)
        kwargs.pop("is_causal", None)
        last_hidden_state = self.encoder(inputs_embeds=hidden_states, attention_mask=mask, is_causal=True,
                                         **kwargs).last_hidden_state
        last_hidden_state = self.final_layer_norm(last_hidden_state)
        rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
        ids = input_ids.to(dtype=torch.int, device=last_hidden_state.device)
        if self.eos_token_id == 2:
            # transformers' convention for the original CLIP vocab: pool the highest token id (the EOT token).
            pooled_output = last_hidden_state[rows, ids.argmax(dim=-1)]
        else:
            pooled_output = last_hidden_state[rows, (ids == self.eos_token_id).int().argmax(dim=-1)]
        return CLIPMoETowerOutput(last_hidden_state=last_hidden_state, pooler_output=pooled_output)


def tower_aux_loss(router_logits, config, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The weighted router losses of one tower (coefficients from its config), or None without router logits:
    load balancing, z-loss, LIMoE's local entropy and its (thresholded) global entropy."""
    if not router_logits:
        return None
    loss = config.router_aux_loss_coef * load_balancing_loss(router_logits, config.top_k, attention_mask)
    if config.router_z_loss_coef > 0:
        loss = loss + config.router_z_loss_coef * router_z_loss(router_logits, attention_mask)
    if config.router_local_entropy_coef > 0:
        loss = loss + config.router_local_entropy_coef * local_entropy_loss(router_logits, attention_mask)
    if config.router_global_entropy_coef > 0:
        loss = loss + config.router_global_entropy_coef * global_entropy_loss(
            router_logits, config.router_global_entropy_min_experts, attention_mask)
    return loss


def _with_aux_loss(out, config, attention_mask: torch.Tensor | None = None):
    """Adds the tower's ``aux_loss`` to its output: computed once, at the tower's head, as Mixtral's head does."""
    if isinstance(out, CLIPMoETowerOutput) and out.router_logits:
        out.aux_loss = tower_aux_loss(out.router_logits, config, attention_mask)
    return out


class CLIPMoEModel(CLIPMoEPreTrainedModel, CLIPModel):
    """Two-tower CLIP-MoE (see the module docstring)."""

    config: CLIPMoEConfig
    config_class = CLIPMoEConfig

    def __init__(self, config: CLIPMoEConfig):
        CLIPPreTrainedModel.__init__(self, config)
        text_config, vision_config = config.text_config, config.vision_config
        self.projection_dim = config.projection_dim
        self.text_embed_dim = text_config.hidden_size
        self.vision_embed_dim = vision_config.hidden_size
        self.text_model = CLIPMoETextModel._from_config(text_config)
        self.vision_model = CLIPMoEVisionModel._from_config(vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(self.config.logit_scale_init_value))
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> CLIPMoEOutput:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        vision_outputs = self.get_image_features(pixel_values=pixel_values,
                                                 interpolate_pos_encoding=interpolate_pos_encoding,
                                                 output_router_logits=output_router_logits, **kwargs)
        text_outputs = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                              position_ids=position_ids, output_router_logits=output_router_logits,
                                              **kwargs)
        image_embeds = nn.functional.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = nn.functional.normalize(text_outputs.pooler_output, dim=-1)
        logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * self.logit_scale.exp()
        logits_per_image = logits_per_text.t()

        image_router_logits = vision_outputs.router_logits if output_router_logits else None
        text_router_logits = text_outputs.router_logits if output_router_logits else None
        terms = [out.aux_loss for out in (vision_outputs, text_outputs)
                 if output_router_logits and out.aux_loss is not None]
        aux_loss = sum(terms) if terms else None

        loss = None
        if return_loss:
            loss = image_text_contrastive_loss(logits_per_text)
            if aux_loss is not None:
                loss = loss + aux_loss
        return CLIPMoEOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            aux_loss=aux_loss,
            image_router_logits=image_router_logits,
            text_router_logits=text_router_logits,
        )
