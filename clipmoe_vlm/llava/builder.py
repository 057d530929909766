"""Assemble a LLaVA-1.5 model from a vision tower, a causal LM and a tokenizer.

The result is transformers' own ``LlavaForConditionalGeneration`` and ``LlavaProcessor``: no subclass, so the
saved folder is a standard LLaVA folder. With a CLIP-MoE tower, its ``config.json`` has a ``vision_config`` of
``model_type="clip_moe_vision_model"``; ``import clipmoe_vlm`` (which registers that type) before
``LlavaForConditionalGeneration.from_pretrained(folder)`` / ``AutoProcessor.from_pretrained(folder)``.

Layout (LLaVA-1.5 -> transformers):

- ``mm_projector`` (``mlp2x_gelu``) -> ``model.multi_modal_projector.linear_1 / linear_2`` (GELU between);
- ``mm_vision_select_layer -2`` -> ``vision_feature_layer=-2``; ``mm_vision_select_feature patch`` ->
  ``vision_feature_select_strategy="default"`` (the CLS token is dropped);
- LLaVA's ``-200`` image sentinel -> a real ``<image>`` token, repeated ``image_seq_length`` times (the patch
  count) by the processor or `clipmoe_vlm.data.llava_dataset.LlavaDataset`;
- ``image_aspect_ratio pad`` -> ``LlavaImageProcessor(do_pad=True)`` (CLIP's resize/crop/normalise plus
  padding to a square of the mean colour, LLaVA's ``expand2square``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPModel,
    CLIPVisionModel,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ..configuration_clip_moe import CLIPMoEConfig, CLIPMoEVisionConfig
from ..data.conversation import DEFAULT_IMAGE_TOKEN, get_template
from ..modeling_clip_moe import CLIPMoEModel, CLIPMoEVisionModel
from ..processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "PROJECTOR_TYPES",
    "build_llava",
    "build_processor",
    "check_llava_folder",
    "load_language_model",
    "load_llava",
    "load_vision_tower",
    "num_image_tokens",
    "set_tower_experts_implementation",
]

CLIP_IMAGE_MEAN, CLIP_IMAGE_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # the LLaVA processor's normalisation
PROJECTOR_TYPES = ("mlp2x_gelu",)
"""Projector types transformers' ``LlavaMultiModalProjector`` implements (LLaVA-1.5's is ``mlp2x_gelu``)."""

_STRATEGIES = ("default", "full")


# --------------------------------------------------------------------------- parts
def load_vision_tower(spec: str | os.PathLike[str] | PreTrainedModel, *, dtype: torch.dtype | None = None
                      ) -> CLIPVisionModel:
    """A vision tower from a folder or a model, dispatched on the config type.

    - CLIP-MoE: a two-tower ``clip_moe`` folder or `CLIPMoEModel` (its ``vision_model``), or a
      ``clip_moe_vision_model`` folder / `CLIPMoEVisionModel` -> `CLIPMoEVisionModel`;
    - dense CLIP (baselines): a ``clip`` folder / ``CLIPModel`` or a ``clip_vision_model`` folder /
      ``CLIPVisionModel`` -> ``CLIPVisionModel``.

    Raises:
        FileNotFoundError: the folder or its ``config.json`` is missing.
        ValueError: the folder holds another model type.
        TypeError: the object is not one of the models above.
    """
    if isinstance(spec, PreTrainedModel):
        if isinstance(spec, (CLIPMoEModel, CLIPModel)):
            return spec.vision_model
        if isinstance(spec, CLIPVisionModel):  # CLIPMoEVisionModel included
            return spec
        raise TypeError(f"vision tower must be a CLIP / CLIP-MoE model or folder, got {type(spec).__name__}")
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"vision tower: no config.json in {path} (expected a CLIP-MoE or CLIP folder; "
                                "build the default one with `python scripts/upcycle_encoder.py`)")
    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if isinstance(config, CLIPMoEConfig):
        return CLIPMoEModel.from_pretrained(path, **kwargs).vision_model
    if isinstance(config, CLIPMoEVisionConfig):
        return CLIPMoEVisionModel.from_pretrained(path, **kwargs)
    if config.model_type == "clip":
        return CLIPModel.from_pretrained(path, **kwargs).vision_model
    if config.model_type == "clip_vision_model":
        return CLIPVisionModel.from_pretrained(path, **kwargs)
    raise ValueError(f"vision tower {path}: model_type {config.model_type!r} is not a CLIP or CLIP-MoE model "
                     "(expected clip_moe, clip_moe_vision_model, clip or clip_vision_model)")


def load_language_model(spec: str | os.PathLike[str] | PreTrainedConfig | PreTrainedModel, *,
                        dtype: torch.dtype | None = None, **from_pretrained_kwargs) -> PreTrainedModel:
    """Any transformers causal LM: a folder / hub id (``AutoModelForCausalLM.from_pretrained``), a config
    (randomly initialised, e.g. a tiny ``LlamaConfig``) or a model."""
    if isinstance(spec, PreTrainedModel):
        model = spec
    elif isinstance(spec, PreTrainedConfig):
        model = AutoModelForCausalLM.from_config(spec, **({} if dtype is None else {"dtype": dtype}))
    else:
        kwargs = dict(from_pretrained_kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(str(spec), **kwargs)
    if model.get_output_embeddings() is None:
        raise TypeError(f"language model {type(model).__name__} has no output embeddings (not a causal LM)")
    return model


def num_image_tokens(vision_config: PreTrainedConfig, strategy: str = "default") -> int:
    """Image features per image: the patch count, plus the CLS token for ``strategy="full"``."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + (1 if strategy == "full" else 0)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Loads the tokenizer if needed and makes sure it has ``<image>`` (one special token) and a pad token."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    ids = tokenizer(DEFAULT_IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"extra_special_tokens": [DEFAULT_IMAGE_TOKEN]},
                                     replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads with <unk>; a tokenizer without one gets its own <pad>.
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def _projector_state(projector: Any) -> dict[str, torch.Tensor] | None:
    """A projector given as a module, a state dict or a weights file -> its state dict (``linear_1/2.*``).

    LLaVA's ``mm_projector.bin`` keys (``mm_projector.0/2.*``, optionally ``model.`` prefixed) and full LLaVA
    keys (``model.multi_modal_projector.*``) are renamed."""
    if isinstance(projector, str) and projector in PROJECTOR_TYPES:
        return None
    if isinstance(projector, nn.Module):
        state = projector.state_dict()
    elif isinstance(projector, Mapping):
        state = dict(projector)
    else:
        path = Path(projector)
        if not path.is_file():
            raise ValueError(f"projector must be one of {PROJECTOR_TYPES}, a module, a state dict or a weights file; "
                             f"got {projector!r}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in state.items():
        for prefix in ("model.multi_modal_projector.", "multi_modal_projector.", "model.mm_projector.",
                       "mm_projector."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        key = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
               "2.bias": "linear_2.bias"}.get(key, key)
        renamed[key] = value
    return renamed


# --------------------------------------------------------------------------- processor
def build_processor(tokenizer: PreTrainedTokenizerBase, vision_config: PreTrainedConfig, *,
                    strategy: str = "default", image_aspect_ratio: str = "pad",
                    template: str = "vicuna_v1") -> LlavaProcessor:
    """``LlavaProcessor``: the tokenizer, a CLIP-style image processor at the tower's resolution (CLIP mean/std,
    ``do_pad`` for ``image_aspect_ratio="pad"``) and the chat template of ``template``."""
    if image_aspect_ratio not in ("pad", "square"):
        raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
    size = int(vision_config.image_size)
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=list(CLIP_IMAGE_MEAN),
        image_std=list(CLIP_IMAGE_STD), do_pad=image_aspect_ratio == "pad", do_convert_rgb=True,
    )
    chat_template = get_template(template).chat_template()
    tokenizer.chat_template = chat_template
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=int(vision_config.patch_size), vision_feature_select_strategy=strategy,
                          chat_template=chat_template, image_token=DEFAULT_IMAGE_TOKEN,
                          num_additional_image_tokens=1)


# --------------------------------------------------------------------------- model
def build_llava(
    vision_tower: str | os.PathLike[str] | PreTrainedModel,
    language_model: str | os.PathLike[str] | PreTrainedConfig | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str],
    *,
    projector: str | os.PathLike[str] | nn.Module | Mapping[str, torch.Tensor] = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    strategy: str = "default",
    image_aspect_ratio: str = "pad",
    template: str = "vicuna_v1",
    dtype: torch.dtype | None = None,
    experts_implementation: str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a LLaVA-1.5 model and its processor.

    Args:
        vision_tower: a CLIP-MoE or CLIP folder or model (see `load_vision_tower`).
        language_model: a causal-LM folder / hub id, a config (random init) or a model (see `load_language_model`).
        tokenizer: the LM's tokenizer (object or folder). ``<image>`` is added as a special token if missing
            (the LM's embeddings are resized) and ``<unk>`` becomes the pad token if there is none.
        projector: ``"mlp2x_gelu"`` (new, randomly initialised) or pretrained projector weights: a module, a state
            dict or a file (``.safetensors`` / ``.bin``; transformers' ``linear_1/2`` or LLaVA's
            ``mm_projector.0/2`` keys).
        vision_feature_layer: the tower layer whose output feeds the projector (LLaVA-1.5: -2).
        strategy: ``"default"`` (drop CLS, LLaVA's ``patch``) or ``"full"``.
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5) or ``"square"``, stored in the image processor.
        template: conversation template whose chat template the processor gets.
        dtype: dtype of the tower and the LM when they are loaded here.
        experts_implementation: the CLIP-MoE tower's experts kernel (``"grouped_mm"``, ``"eager"``,
            ``"batched_mm"``); None keeps the tower's (see `set_tower_experts_implementation`).

    Returns:
        ``(model, processor)``; ``model.config.image_token_id`` is the tokenizer's ``<image>`` id and
        ``image_seq_length`` the number of image features.

    Raises:
        ValueError: a projector whose input or output size disagrees with the tower's or LM's hidden size, an
            unknown projector type or strategy.
    """
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    projector_state = _projector_state(projector)
    tower = load_vision_tower(vision_tower, dtype=dtype)
    lm = load_language_model(language_model, dtype=dtype)
    tokenizer = _prepare_tokenizer(tokenizer)

    vision_config, text_config = tower.config, lm.config
    if not -vision_config.num_hidden_layers - 1 <= vision_feature_layer <= vision_config.num_hidden_layers:
        raise ValueError(f"vision_feature_layer={vision_feature_layer} is outside the tower's "
                         f"{vision_config.num_hidden_layers} layers")
    if projector_state is not None:
        expected = {"linear_1.weight": (text_config.hidden_size, vision_config.hidden_size),
                    "linear_2.weight": (text_config.hidden_size, text_config.hidden_size)}
        for key, shape in expected.items():
            if key not in projector_state:
                raise ValueError(f"projector weights have no {key!r} (keys: {sorted(projector_state)})")
            found = tuple(projector_state[key].shape)
            if found != shape:
                raise ValueError(
                    f"projector {key} has shape {found} but the vision tower's hidden_size is "
                    f"{vision_config.hidden_size} and the language model's hidden_size is {text_config.hidden_size} "
                    f"(expected {shape}): the projector was trained for another tower or LM")

    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64 if len(tokenizer) > 4096 else None)
    image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=lm.config,
        image_token_id=image_token_id,
        image_seq_length=num_image_tokens(vision_config, strategy),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.base_model
    model.lm_head = lm.get_output_embeddings()
    lm_dtype = lm.get_input_embeddings().weight.dtype
    new_projector = LlavaMultiModalProjector(config).to(lm_dtype)
    if projector_state is not None:
        new_projector.load_state_dict(projector_state, strict=True)
    model.model.multi_modal_projector = new_projector
    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:
        raise RuntimeError(f"build_llava left parameters on the meta device: {leftover[:5]}")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    processor = build_processor(tokenizer, vision_config, strategy=strategy, image_aspect_ratio=image_aspect_ratio,
                                template=template)
    if experts_implementation is not None:
        set_tower_experts_implementation(model, experts_implementation)
    return model, processor


def set_tower_experts_implementation(model: nn.Module, experts_implementation: str) -> None:
    """Sets the experts kernel of the CLIP-MoE vision tower inside ``model`` (a LLaVA, also wrapped by PEFT);
    the language model keeps its own. ``load_llava(folder, experts_implementation=...)`` does the same at load.

    Raises:
        ValueError: ``model`` has no CLIP-MoE tower.
    """
    towers = [m for m in model.modules() if isinstance(m, CLIPMoEVisionModel)]
    if not towers:
        raise ValueError("experts_implementation: the vision tower is not a CLIP-MoE")
    for tower in towers:
        tower.set_experts_implementation(experts_implementation)


# what a user most often passes by mistake, for the "not a LLaVA folder" error
_FOLDER_KINDS = {
    "clip_moe": "a CLIP-MoE folder (use it as --vision-tower of `clipmoe train-llava`)",
    "clip_moe_vision_model": "a CLIP-MoE vision tower folder (use it as --vision-tower of `clipmoe train-llava`)",
    "clip": "a dense CLIP folder (use it as --vision-tower of `clipmoe train-llava`)",
    "clip_vision_model": "a CLIP vision tower folder (use it as --vision-tower of `clipmoe train-llava`)",
}


def check_llava_folder(folder: str | os.PathLike[str], what: str = "LLaVA folder") -> Path:
    """``folder`` if its ``config.json`` is a LLaVA config; otherwise one error saying what the folder is.

    transformers itself would load a CLIP-MoE folder's config into ``LlavaForConditionalGeneration`` and fail
    deep inside with an ``AttributeError`` on ``tie_word_embeddings``.

    Raises:
        FileNotFoundError: no folder, or no ``config.json`` in it.
        ValueError: its ``model_type`` is not ``llava``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{what} {folder} has no config.json (expected a LLaVA folder saved by "
                                "`clipmoe train-llava` or `clipmoe merge-lora`)")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{config_file}: not a readable JSON config ({error})") from error
    if model_type != "llava":
        kind = _FOLDER_KINDS.get(model_type, f"a {model_type!r} model folder")
        raise ValueError(f"{what} {folder} is {kind}: its config.json has model_type {model_type!r}, expected "
                         "'llava' (a folder saved by `clipmoe train-llava` or `clipmoe merge-lora`)")
    return folder


def load_llava(folder: str | os.PathLike[str], *, dtype: torch.dtype | None = None, **kwargs
               ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a saved LLaVA folder (model and processor). A LoRA adapter folder (``adapter_config.json``) is loaded
    onto its base and merged (see `clipmoe_vlm.llava.lora.load_lora_llava`).

    Raises:
        FileNotFoundError, ValueError: the folder is missing or is not a LLaVA folder (see `check_llava_folder`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LLaVA folder not found: {folder}")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        from .lora import load_lora_llava

        return load_lora_llava(folder, dtype=dtype, merge=True)
    check_llava_folder(folder)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs)
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


def describe(model: LlavaForConditionalGeneration) -> dict[str, Any]:
    """A short JSON-able description of a LLaVA model (for model cards and logs)."""
    vision = model.config.vision_config
    return {
        "vision_tower": vision.model_type,
        "vision_hidden_size": vision.hidden_size,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "num_experts": getattr(vision, "num_experts", None),
        "top_k": getattr(vision, "top_k", None),
        "language_model": model.config.text_config.model_type,
        "text_hidden_size": model.config.text_config.hidden_size,
        "image_seq_length": model.config.image_seq_length,
        "vision_feature_layer": model.config.vision_feature_layer,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
