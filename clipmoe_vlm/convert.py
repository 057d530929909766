"""Checked state-dict transforms between dense CLIPs, the official CLIP-MoE release and `CLIPMoEModel`.

Three source layouts are understood:

- **transformers** ``CLIPModel`` (``vision_model.*``, ``text_model.*``, ``visual_projection``, ...), standalone
  ``CLIPVisionModel``/``CLIPTextModel`` state dicts, and the transformers 4.x standalone layout with the extra
  ``vision_model.``/``text_model.`` prefix;
- **OpenAI layout** as used by open_clip's ``CLIP`` and the OpenAI ``clip`` package (``visual.conv1``,
  ``visual.transformer.resblocks.{i}.attn.in_proj_weight``, ``mlp.c_fc``/``c_proj``, ``text_projection``, ...);
- **official CLIP-MoE release** (arXiv 2409.19291, OpenSparseLLMs/CLIP-MoE): the OpenAI layout where an MoE
  block has ``experts.{e}.c_fc``/``c_proj`` and ``gate`` instead of ``mlp``, plus Long-CLIP's
  ``positional_embedding_res`` for text positions >= 20.

Files in the OpenAI layout are read by `read_checkpoint`: a ``torch.save`` state dict (safe loader only) or a
TorchScript archive, the form of OpenAI's own CLIP ``.pt`` files. `stretch_text_positions` gives a text tower
Long-CLIP's 248 positions, the starting point of the official CLIP-MoE.

Every transform lists its keys explicitly, checks shapes, and loads strictly: a key that is missing, left over
or of the wrong shape raises `CheckpointMismatchError` naming it.
"""

from __future__ import annotations

import math
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

from .checkpoint import CheckpointMismatchError, check_shapes
from .configuration_clip_moe import MOE_CONFIG_FIELDS, CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from .modeling_clip_moe import CLIPMoEModel, CLIPMoETextModel, CLIPMoEVisionModel
from .moe import CLIPMoERouter, rename_legacy_expert_key

__all__ = [
    "LONGCLIP_TEXT_POSITIONS",
    "SUPPORTED_SOURCES",
    "CheckpointMismatchError",
    "StackedStateDict",
    "load_official_clipmoe",
    "load_state_dict_checked",
    "moe_config_from_dense",
    "openai_layout_to_hf",
    "parse_moe_layers",
    "read_checkpoint",
    "sparse_upcycle",
    "stretch_text_positions",
    "upcycle_state_dict",
]

SUPPORTED_SOURCES = (
    "transformers CLIPModel, CLIPVisionModel or CLIPTextModel (or a folder/hub id holding one)",
    "open_clip CLIP with a ViT image tower (OpenAI key layout)",
    "official CLIP-MoE release state dict (.pt, OpenAI layout with experts.{e}.c_fc and gate keys)",
)

# Long-CLIP (and so CLIP-MoE) keeps the first 20 text positions from `positional_embedding` and takes the
# rest from `positional_embedding_res`.
_LONGCLIP_KEEP_POSITIONS = 20
# Long-CLIP's text length: OpenAI's 77 positions with the 57 after the first 20 stretched 4x (20 + 4 * 57).
LONGCLIP_TEXT_POSITIONS = 248


class StackedStateDict(Mapping):
    """A read-only state dict whose stacked expert tensors are built when read (`upcycle_state_dict` with
    ``expert_sources``): `load_state_dict_checked` copies each source tensor straight into its expert's slice of
    the model, so assembling experts from several sources never builds a stacked copy."""

    def __init__(self, tensors: dict[str, torch.Tensor], stacks: dict[str, tuple[list[torch.Tensor], torch.dtype]]):
        self._tensors, self._stacks = tensors, stacks

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._stacks:
            pieces, dtype = self._stacks[key]
            return torch.stack([p.detach().to(dtype) for p in pieces])
        return self._tensors[key]

    def __iter__(self):
        yield from self._tensors
        yield from self._stacks

    def __len__(self) -> int:
        return len(self._tensors) + len(self._stacks)

    def shape(self, key: str) -> tuple:
        if key in self._stacks:
            pieces, _ = self._stacks[key]
            return (len(pieces), *pieces[0].shape)
        return tuple(self._tensors[key].shape)


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"):
    """``model.load_state_dict(state_dict, strict=True)`` with one clear error naming the first bad key.

    A `StackedStateDict` is loaded stacked tensor by stacked tensor (its shapes are checked without building them).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if isinstance(state_dict, StackedStateDict):
        check_shapes(expected, {k: state_dict.shape(k) for k in state_dict}, source)
        model.load_state_dict(state_dict._tensors, strict=False)  # every key checked above
        targets = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, (pieces, _) in state_dict._stacks.items():
                for e, piece in enumerate(pieces):  # in place, expert by expert: no stacked temporary
                    targets[key][e].copy_(piece)
        return model
    state_dict = {rename_legacy_expert_key(k): v for k, v in state_dict.items()}  # pre-interface expert names
    check_shapes(expected, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    model.load_state_dict(state_dict, strict=True)
    return model


def _empty_model(model_cls, config, dtype: torch.dtype = torch.float32, device="cpu"):
    """``model_cls(config)`` without the random initialisation and without touching memory: built on the meta
    device, then given uninitialised storage, so a caller must fill every tensor (a full random init of a
    ViT-L/14-336 CLIP-MoE takes most of a minute). The routers, which no checkpoint provides when upcycling, get
    nn.Linear's kaiming-uniform init here, in module order, and the ``position_ids`` buffers their values."""
    with torch.device("meta"):
        model = model_cls(config)
    model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CLIPMoERouter):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            ids = getattr(module, "position_ids", None)
            if isinstance(ids, torch.Tensor):
                ids.copy_(torch.arange(ids.shape[-1], device=ids.device).expand_as(ids))
    return model


def _is_torchscript_archive(path: Path) -> bool:
    """A TorchScript archive is a zip whose top folder holds ``constants.pkl`` (torch.load's own test)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def read_checkpoint(path: str | Path, where: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a ``.pt``/``.pth``/``.bin`` file, on CPU.

    A ``torch.save`` file goes through the safe loader (``weights_only=True``) only; a ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper (training checkpoints) is unwrapped. A TorchScript archive, the form of OpenAI's own
    CLIP files, which the safe loader refuses, is read with ``torch.jit.load`` (it runs no pickled Python).
    Any failure raises ``ValueError`` naming the file (``where`` prefixes the message, e.g. the flag).
    """
    path = Path(path)
    prefix = f"{where}: " if where else ""
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit as deprecated; these files need it
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as err:  # a damaged archive: RuntimeError from the reader
            raise ValueError(f"{prefix}cannot read the TorchScript archive {path}: {err}") from None
        return dict(state)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or truncated file, or a pickle the safe loader refuses; never retried unsafely
        raise ValueError(f"{prefix}cannot read {path} as a PyTorch state dict ({type(err).__name__}: {err})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state \
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{prefix}{path} holds a {type(state).__name__}, not a state dict of named tensors")
    return dict(state)


# --------------------------------------------------------------------------------------------------------------
# MoE layer specs and configs


def parse_moe_layers(spec, num_layers: int) -> list[int] | None:
    """Resolves an MoE-layer spec for a tower of ``num_layers`` layers.

    ``None``/"all": every layer (returned as None); "every-2" (or "every-other"): layers 1, 3, 5, ... (V-MoE's
    convention); "last-N": the last N layers (CLIP-MoE's ``--moe-layers N``); "0,2,5" or a list of ints: exactly
    those (negative indices count from the end).
    """
    if spec is None or spec == "all":
        return None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("every-2", "every-other", "every_other"):
            return list(range(1, num_layers, 2))
        if text.startswith("last-"):
            n = int(text[5:])
            if not 0 < n <= num_layers:
                raise ValueError(f"moe_layers '{spec}': N must be in 1..{num_layers}")
            return list(range(num_layers - n, num_layers))
        try:
            spec = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"moe_layers '{spec}' is not one of: all, every-2, last-N, or a comma-separated list of indices"
            ) from None
    layers = sorted({i % num_layers if -num_layers <= i < 0 else i for i in spec})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"moe_layers {list(spec)} has indices outside range({num_layers}): {bad}")
    return layers


def _moe_fields(num_experts: int, top_k: int, moe_layers, num_layers: int, options: Mapping) -> dict:
    unknown = set(options) - set(MOE_CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown MoE options {sorted(unknown)}; valid: {sorted(MOE_CONFIG_FIELDS)}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    return {**options, "num_experts": num_experts, "top_k": top_k,
            "moe_layers": parse_moe_layers(moe_layers, num_layers)}


def _tower_spec(moe_layers, tower: str):
    if isinstance(moe_layers, Mapping):
        return moe_layers.get(tower)
    return moe_layers


def moe_config_from_dense(dense_config, num_experts: int = 4, top_k: int = 2, moe_layers=None,
                          vision_options: Mapping | None = None, text_options: Mapping | None = None, **options):
    """The CLIP-MoE config of a dense transformers CLIP config (``CLIPConfig`` or a tower config).

    ``moe_layers`` is a spec for `parse_moe_layers`, or a dict ``{"vision": spec, "text": spec}``. ``options``
    are further MoE fields (router noise, expert dropout, capacity factor, loss coefficients) for both towers;
    ``vision_options``/``text_options`` override them per tower.
    """
    vision_options = {**options, **(vision_options or {})}
    text_options = {**options, **(text_options or {})}

    def tower(cfg, moe_cls, name, tower_options):
        fields = _moe_fields(num_experts, top_k, _tower_spec(moe_layers, name), cfg.num_hidden_layers,
                             tower_options)
        data = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "transformers_version")}
        return moe_cls(**{**data, **fields})

    if isinstance(dense_config, CLIPConfig):
        data = {k: v for k, v in dense_config.to_dict().items()
                if k not in ("model_type", "transformers_version", "vision_config", "text_config", "architectures",
                             "upcycling_info")}
        return CLIPMoEConfig(
            **data,
            vision_config=tower(dense_config.vision_config, CLIPMoEVisionConfig, "vision", vision_options),
            text_config=tower(dense_config.text_config, CLIPMoETextConfig, "text", text_options),
        )
    if isinstance(dense_config, CLIPVisionConfig):
        return tower(dense_config, CLIPMoEVisionConfig, "vision", vision_options)
    if isinstance(dense_config, CLIPTextConfig):
        return tower(dense_config, CLIPMoETextConfig, "text", text_options)
    raise TypeError(f"expected a transformers CLIP config, got {type(dense_config).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Dense transformers CLIP -> CLIP-MoE


_MLP_KEY = re.compile(r"^(?P<prefix>.*encoder\.layers\.(?P<layer>\d+)\.mlp)\.(?P<fc>fc[12])\.(?P<kind>weight|bias)$")


def _expert_param(fc: str, kind: str) -> str:
    """The stacked experts parameter that holds a dense ``mlp.{fc}.{kind}`` (experts interface names)."""
    return {"fc1": "up_proj", "fc2": "down_proj"}[fc] + ("_bias" if kind == "bias" else "")


def _normalize_hf_keys(state_dict: Mapping[str, torch.Tensor], target_keys) -> dict[str, torch.Tensor]:
    """Drops the transformers 4.x standalone ``vision_model.``/``text_model.`` prefix when the target has none."""
    target_has_prefix = any(k.startswith(("vision_model.", "text_model.")) for k in target_keys)
    out = {}
    for key, value in state_dict.items():
        if not target_has_prefix:
            key = re.sub(r"^(vision_model|text_model)\.", "", key)
        out[key] = value
    return out


def upcycle_state_dict(dense_sd: Mapping[str, torch.Tensor], moe_model: nn.Module,
                       expert_sources: list[Mapping[str, torch.Tensor]] | None = None) -> Mapping[str, torch.Tensor]:
    """Maps a dense transformers-CLIP state dict onto ``moe_model``'s keys.

    Each MoE layer's ``mlp.fc1``/``fc2`` become the stacked ``mlp.experts.up_proj*``/``down_proj*`` tensors: expert ``e``
    takes its FFN from ``expert_sources[e]`` (default: every expert is a copy of ``dense_sd``, sparse upcycling).
    Routers keep ``moe_model``'s own initialisation. Every dense key is used exactly once.

    Nothing is copied: without ``expert_sources`` an expert tensor is the dense tensor expanded to E experts (a
    view; ``.contiguous()`` it before saving), and with them the result is a `StackedStateDict` that stacks a
    tensor when it is read. `load_state_dict_checked` then copies each tensor once, into the model.
    """
    target = moe_model.state_dict()
    dense_sd = _normalize_hf_keys(dense_sd, target)
    num_sources = None if expert_sources is None else len(expert_sources)
    if expert_sources is not None:
        expert_sources = [_normalize_hf_keys(sd, target) for sd in expert_sources]
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, tuple[list[torch.Tensor], torch.dtype]] = {}
    for key, value in dense_sd.items():
        match = _MLP_KEY.match(key)
        moe_key = None
        if match:
            moe_key = f"{match['prefix']}.experts.{_expert_param(match['fc'], match['kind'])}"
        if moe_key is not None and moe_key in target:
            num_experts, dtype = target[moe_key].shape[0], target[moe_key].dtype
            if num_sources is not None and num_sources != num_experts:
                raise CheckpointMismatchError(
                    f"{num_sources} expert sources given but '{moe_key}' holds {num_experts} experts"
                )
            if expert_sources is None:
                out[moe_key] = value.detach().to(dtype).unsqueeze(0).expand(num_experts, *value.shape)
            else:
                for e, sd in enumerate(expert_sources):
                    if key not in sd:
                        raise CheckpointMismatchError(f"expert source {e} has no key '{key}' (for '{moe_key}')")
                stacks[moe_key] = ([sd[key] for sd in expert_sources], dtype)
        elif key in target:
            out[key] = value.detach().to(target[key].dtype)
        elif key.endswith("position_ids"):
            continue  # a buffer some transformers versions saved
        else:
            raise CheckpointMismatchError(f"dense checkpoint key '{key}' has no place in {type(moe_model).__name__}")
    for key, value in target.items():
        if key not in out and key not in stacks:
            if key.endswith(".mlp.gate.weight"):
                out[key] = value.detach().clone()  # new router: keep the model's own initialisation
            elif key.endswith("position_ids"):
                out[key] = value.clone()
    return out if expert_sources is None else StackedStateDict(out, stacks)


def _hf_moe_class(dense: nn.Module):
    for dense_cls, moe_cls in ((CLIPModel, CLIPMoEModel), (CLIPVisionModel, CLIPMoEVisionModel),
                               (CLIPTextModel, CLIPMoETextModel)):
        if isinstance(dense, dense_cls):
            return moe_cls
    return None


def sparse_upcycle(dense, num_experts: int = 4, top_k: int = 2, moe_layers=None, upcycling_info: dict | None = None,
                   experts_implementation: str | None = None,
                   expert_sources: list[Mapping[str, torch.Tensor]] | None = None, **moe_options):
    """Turns a dense CLIP into a CLIP-MoE whose experts are copies of the dense FFN (sparse upcycling), or, with
    ``expert_sources``, whose expert ``e`` is the FFN of ``expert_sources[e]`` (DMU's assembly).

    Args:
        dense: a transformers ``CLIPModel`` (-> `CLIPMoEModel`), ``CLIPVisionModel`` (-> `CLIPMoEVisionModel`),
            ``CLIPTextModel`` (-> `CLIPMoETextModel`), or an open_clip ``CLIP`` with a ViT tower (-> `CLIPMoEModel`).
        num_experts, top_k: experts per MoE layer and per token.
        moe_layers: which layers become MoE: None/"all", "every-2", "last-N", a list of indices, or a dict
            ``{"vision": spec, "text": spec}`` (see `parse_moe_layers`).
        moe_options: further MoE config fields (``norm_topk_prob``, ``router_jitter_noise``, ``expert_dropout``,
            ``capacity_factor``, ``batch_priority_routing``, ``router_aux_loss_coef``, ``router_z_loss_coef``).
        experts_implementation: the experts kernel (``"grouped_mm"``, ``"eager"``, ``"batched_mm"``; None: the
            default, eager without CUDA and grouped_mm with it); it does not change the function, and it is not
            saved with the model.
        expert_sources: one state dict per expert (transformers CLIP keys, as ``dense.state_dict()``), each with
            every FFN key of the MoE layers; the rest of the model comes from ``dense``. Each expert tensor is
            written once, straight from its source.

    With renormalised top-k weights (the default) the result computes exactly the dense function until the
    experts are trained apart; the routers are new.
    """
    if _is_open_clip_model(dense):
        dense = open_clip_to_hf(dense)
    moe_cls = _hf_moe_class(dense)
    if moe_cls is None or isinstance(dense, (CLIPMoEModel, CLIPMoEVisionModel, CLIPMoETextModel)):
        raise TypeError(
            f"sparse_upcycle cannot convert {type(dense).__name__}; supported sources: " + "; ".join(SUPPORTED_SOURCES)
        )
    config = moe_config_from_dense(dense.config, num_experts, top_k, moe_layers, **moe_options)
    if upcycling_info is not None and isinstance(config, CLIPMoEConfig):
        config.upcycling_info = dict(upcycling_info)
    first = next(dense.parameters())
    # no random init and no second copy: every tensor is written once, from the dense model's (peak: dense + MoE)
    moe = _empty_model(moe_cls, config, first.dtype, first.device)
    source = f"upcycled {type(dense).__name__}" + (" with expert sources" if expert_sources else "")
    load_state_dict_checked(moe, upcycle_state_dict(dense.state_dict(), moe, expert_sources=expert_sources), source)
    if experts_implementation is not None:
        moe.set_experts_implementation(experts_implementation)
    return moe.train(dense.training)


# --------------------------------------------------------------------------------------------------------------
# OpenAI layout (open_clip, OpenAI clip, official CLIP-MoE) -> transformers layout


def _is_open_clip_model(obj) -> bool:
    return type(obj).__module__.startswith("open_clip") and hasattr(obj, "visual") and hasattr(obj, "transformer")


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"resblocks\.(\d+)\.")
    indices = {int(m.group(1)) for k in sd for m in [pattern.match(k)] if m}
    return max(indices) + 1 if indices else 0


def _expert_indices(sd, block_prefix: str) -> list[int]:
    pattern = re.compile(re.escape(block_prefix) + r"experts\.(\d+)\.c_fc\.weight$")
    return sorted(int(m.group(1)) for k in sd for m in [pattern.match(k)] if m)


def _convert_blocks(sd, src_prefix: str, dst_prefix: str, num_layers: int, out: dict, used: set,
                    num_experts: int | None, stacks: dict) -> list[int]:
    """Converts the resblocks of one tower; returns the indices of its MoE layers. The experts' pieces go to
    ``stacks`` (stacked when loaded, see `StackedStateDict`)."""
    moe_layers = []
    for i in range(num_layers):
        src = f"{src_prefix}resblocks.{i}."
        dst = f"{dst_prefix}encoder.layers.{i}."

        def take(key):
            if src + key not in sd:
                raise CheckpointMismatchError(f"missing key '{src + key}'")
            used.add(src + key)
            return sd[src + key]

        for ln_src, ln_dst in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            out[dst + f"{ln_dst}.weight"] = take(f"{ln_src}.weight")
            out[dst + f"{ln_dst}.bias"] = take(f"{ln_src}.bias")
        q, k, v = take("attn.in_proj_weight").chunk(3, dim=0)
        qb, kb, vb = take("attn.in_proj_bias").chunk(3, dim=0)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[dst + f"self_attn.{name}.weight"] = w
            out[dst + f"self_attn.{name}.bias"] = b
        out[dst + "self_attn.out_proj.weight"] = take("attn.out_proj.weight")
        out[dst + "self_attn.out_proj.bias"] = take("attn.out_proj.bias")
        experts = _expert_indices(sd, src)
        if experts:
            if experts != list(range(len(experts))):
                raise CheckpointMismatchError(f"experts of '{src}' are not numbered 0..E-1: {experts}")
            if num_experts is not None and len(experts) != num_experts:
                bad = f"{src}experts.{min(len(experts), num_experts)}.c_fc.weight"
                raise CheckpointMismatchError(
                    f"key '{bad}': the checkpoint has {len(experts)} experts in this layer, the config asks for "
                    f"{num_experts}"
                )
            for fc_src, fc_dst in (("c_fc", "fc1"), ("c_proj", "fc2")):
                for kind in ("weight", "bias"):
                    pieces = [take(f"experts.{e}.{fc_src}.{kind}") for e in experts]
                    for e, piece in enumerate(pieces):
                        if piece.shape != pieces[0].shape:
                            raise CheckpointMismatchError(
                                f"key '{src}experts.{e}.{fc_src}.{kind}' has shape {tuple(piece.shape)}, expert 0 "
                                f"has {tuple(pieces[0].shape)}"
                            )
                    stacks[dst + f"mlp.experts.{_expert_param(fc_dst, kind)}"] = (pieces, pieces[0].dtype)
            out[dst + "mlp.gate.weight"] = take("gate.weight")
            moe_layers.append(i)
        else:
            for fc_src, fc_dst in (("c_fc", "fc1"), ("c_proj", "fc2")):
                out[dst + f"mlp.{fc_dst}.weight"] = take(f"mlp.{fc_src}.weight")
                out[dst + f"mlp.{fc_dst}.bias"] = take(f"mlp.{fc_src}.bias")
    return moe_layers


def _heads(width: int, heads: int | None, tower: str) -> int:
    if heads is not None:
        return heads
    if width % 64:
        raise ValueError(f"cannot infer the {tower} tower's head count from width {width}: pass {tower}_heads")
    return width // 64  # OpenAI CLIP: 64-dim heads in both towers


def openai_layout_to_hf(sd: Mapping[str, torch.Tensor], vision_heads: int | None = None,
                        text_heads: int | None = None, hidden_act: str = "quick_gelu",
                        num_experts: int | None = None, top_k: int = 2, source: str = "checkpoint"):
    """Converts an OpenAI-layout CLIP state dict (dense or official CLIP-MoE) to transformers keys.

    Returns ``(config, state_dict)``: a ``CLIPConfig`` and a dict when no block has experts, else a `CLIPMoEConfig`
    whose ``moe_layers`` are the blocks that have them and a `StackedStateDict` (experts stacked when read, so that
    loading holds one stacked tensor at a time). Head counts default to width/64 (OpenAI CLIP).
    """
    sd = {re.sub(r"^module\.", "", k): v for k, v in sd.items()}
    required = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
                "token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight")
    for key in required:
        if key not in sd:
            raise CheckpointMismatchError(
                f"{source}: key '{key}' not found; this is not an OpenAI-layout CLIP. Supported sources: "
                + "; ".join(SUPPORTED_SOURCES)
            )
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, tuple[list[torch.Tensor], torch.dtype]] = {}
    used: set[str] = set()

    def take(key):
        used.add(key)
        return sd[key]

    conv = take("visual.conv1.weight")
    width, patch = conv.shape[0], conv.shape[-1]
    pos = take("visual.positional_embedding")
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1:
        raise CheckpointMismatchError(f"{source}: 'visual.positional_embedding' has {pos.shape[0]} rows, not 1+grid^2")
    v_layers = _count_blocks(sd, "visual.transformer.")
    out["vision_model.embeddings.patch_embedding.weight"] = conv
    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.position_embedding.weight"] = pos
    for src, dst in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[f"vision_model.{dst}.weight"] = take(f"visual.{src}.weight")
        out[f"vision_model.{dst}.bias"] = take(f"visual.{src}.bias")
    v_moe = _convert_blocks(sd, "visual.transformer.", "vision_model.", v_layers, out, used, num_experts, stacks)
    proj = take("visual.proj")
    out["visual_projection.weight"] = proj.t().contiguous()

    tok = take("token_embedding.weight")
    t_pos = take("positional_embedding")
    if "positional_embedding_res" in sd:
        res = take("positional_embedding_res")
        keep = torch.arange(t_pos.shape[0]) < _LONGCLIP_KEEP_POSITIONS
        t_pos = torch.where(keep[:, None], t_pos, res)
    t_width = sd["ln_final.weight"].shape[0]
    t_layers = _count_blocks(sd, "transformer.")
    out["text_model.embeddings.token_embedding.weight"] = tok
    out["text_model.embeddings.position_embedding.weight"] = t_pos
    out["text_model.final_layer_norm.weight"] = take("ln_final.weight")
    out["text_model.final_layer_norm.bias"] = take("ln_final.bias")
    t_moe = _convert_blocks(sd, "transformer.", "text_model.", t_layers, out, used, num_experts, stacks)
    out["text_projection.weight"] = take("text_projection").t().contiguous()
    if "logit_scale" in sd:
        out["logit_scale"] = take("logit_scale")
    leftover = [k for k in sd if k not in used and k not in ("attn_mask", "input_resolution", "context_length",
                                                                "vocab_size")]
    if leftover:
        raise CheckpointMismatchError(f"{source}: key '{leftover[0]}' is not understood ({len(leftover)} left over)")

    def first_intermediate(prefix, moe):
        if 0 in moe:
            return stacks[f"{prefix}encoder.layers.0.mlp.experts.up_proj"][0][0].shape[-2]
        return out[f"{prefix}encoder.layers.0.mlp.fc1.weight"].shape[-2]

    vocab = tok.shape[0]
    vision = dict(hidden_size=width, intermediate_size=first_intermediate("vision_model.", v_moe),
                  num_hidden_layers=v_layers, num_attention_heads=_heads(width, vision_heads, "vision"),
                  image_size=grid * patch, patch_size=patch, hidden_act=hidden_act, projection_dim=proj.shape[1])
    # eos_token_id=2 selects transformers' argmax pooling (the EOT token has the highest id), as OpenAI CLIP.
    text = dict(vocab_size=vocab, hidden_size=t_width, intermediate_size=first_intermediate("text_model.", t_moe),
                num_hidden_layers=t_layers, num_attention_heads=_heads(t_width, text_heads, "text"),
                max_position_embeddings=t_pos.shape[0], hidden_act=hidden_act, projection_dim=proj.shape[1],
                eos_token_id=2, bos_token_id=vocab - 2, pad_token_id=0)
    scale = float(out["logit_scale"]) if "logit_scale" in out else math.log(1 / 0.07)
    if not v_moe and not t_moe:
        config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=proj.shape[1],
                            logit_scale_init_value=scale)
        return config, out
    e = len(stacks[f"vision_model.encoder.layers.{v_moe[0]}.mlp.experts.up_proj"][0]) if v_moe else \
        len(stacks[f"text_model.encoder.layers.{t_moe[0]}.mlp.experts.up_proj"][0])
    config = CLIPMoEConfig(
        vision_config={**vision, "num_experts": e, "top_k": top_k,
                       "moe_layers": None if len(v_moe) == v_layers else v_moe},
        text_config={**text, "num_experts": e, "top_k": top_k,
                     "moe_layers": None if len(t_moe) == t_layers else t_moe},
        projection_dim=proj.shape[1], logit_scale_init_value=scale,
    )
    out.setdefault("logit_scale", torch.tensor(scale))
    return config, StackedStateDict(out, stacks)


def open_clip_to_hf(model) -> CLIPModel:
    """An open_clip ``CLIP`` (ViT image tower, OpenAI layout) as an equivalent transformers ``CLIPModel``."""
    visual = model.visual
    unsupported = [name for name in ("attn_pool", "text_pool_proj") if getattr(visual, name, None) is not None]
    if not hasattr(visual, "conv1") or unsupported or getattr(visual, "final_ln_after_pool", False) \
            or getattr(visual, "pool_type", "tok") != "tok" or getattr(model, "text_pool_type", "argmax") != "argmax" \
            or getattr(model, "logit_bias", None) is not None:
        raise TypeError(
            "only open_clip CLIP models with a plain ViT tower (class-token pooling), argmax text pooling and no "
            "logit bias can be converted; supported sources: " + "; ".join(SUPPORTED_SOURCES)
        )
    act = type(visual.transformer.resblocks[0].mlp.gelu).__name__
    hidden_act = {"QuickGELU": "quick_gelu", "GELU": "gelu"}.get(act)
    if hidden_act is None:
        raise TypeError(f"open_clip activation {act} has no transformers equivalent")
    config, state = openai_layout_to_hf(
        model.state_dict(),
        vision_heads=visual.transformer.resblocks[0].attn.num_heads,
        text_heads=model.transformer.resblocks[0].attn.num_heads,
        hidden_act=hidden_act,
        source=f"open_clip {type(model).__name__}",
    )
    hf = CLIPModel(config)
    load_state_dict_checked(hf, {**state, **{k: v for k, v in hf.state_dict().items() if k.endswith("position_ids")}},
                            source="open_clip model")
    return hf.to(next(model.parameters()).dtype)


def load_official_clipmoe(path_or_state_dict, num_experts: int | None = None, top_k: int = 2,
                          vision_heads: int | None = None, text_heads: int | None = None,
                          hidden_act: str = "quick_gelu", source: str | None = None,
                          **moe_options) -> CLIPMoEModel:
    """Loads the official CLIP-MoE release (a ``torch.save`` state dict in OpenAI layout) as a `CLIPMoEModel`.

    ``num_experts``, when given, must match the checkpoint (else `CheckpointMismatchError` names the key);
    ``top_k`` and ``moe_options`` set the routing (the release was trained with top-2, renormalised).
    ``source`` names an already-loaded state dict in error messages (a path names itself).
    """
    source = source or "state dict"
    if isinstance(path_or_state_dict, (str, Path)):
        source = str(path_or_state_dict)
        if not Path(source).is_file():
            raise FileNotFoundError(f"CLIP-MoE checkpoint not found: {source}")
        sd = read_checkpoint(source)
    else:
        sd = path_or_state_dict
        for wrapper in ("state_dict", "model"):
            if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
                sd = sd[wrapper]
    config, state = openai_layout_to_hf(sd, vision_heads, text_heads, hidden_act, num_experts, top_k, source)
    if not isinstance(config, CLIPMoEConfig):
        raise CheckpointMismatchError(f"{source}: no 'experts.{{e}}.c_fc' keys, this is a dense CLIP checkpoint")
    for tower in (config.vision_config, config.text_config):
        for key, value in moe_options.items():
            setattr(tower, key, value)
    config.upcycling_info = {"source": source, "format": "official-clip-moe"}
    model = _empty_model(CLIPMoEModel, config)  # no random init: the checkpoint fills every tensor
    return load_state_dict_checked(model, state, source=source)


# --------------------------------------------------------------------------------------------------------------
# Long-CLIP's text positions


def stretch_text_positions(model: nn.Module, positions: int = LONGCLIP_TEXT_POSITIONS,
                           keep: int = _LONGCLIP_KEEP_POSITIONS) -> nn.Module:
    """Gives the text tower of ``model`` ``positions`` positions as Long-CLIP does (in place; returns ``model``).

    The official CLIP-MoE starts every stage from Long-CLIP's ``load_from_clip``: of OpenAI's 77 positions the
    first ``keep`` (20) are kept, and new position ``r >= keep`` sits at ``t = keep + (r - keep) / 4`` on the old
    table: linearly interpolated between old rows ``floor(t)`` and ``floor(t) + 1``, and past the last old row
    extrapolated along the last step (248 = 20 + 4 * 57 rows). For other lengths the step is
    ``(old - keep) / (positions - keep)``, which is 1/4 for 77 -> 248. A text of at most ``keep`` tokens embeds
    exactly as before. The config's ``max_position_embeddings``, the position table and the ``position_ids``
    buffer follow; a CLIP-MoE records ``text_positions`` in its ``upcycling_info``.

    ``model``: a transformers ``CLIPModel``/``CLIPTextModel`` or a CLIP-MoE one. A model that already has
    ``positions`` positions is returned unchanged; fewer than it has raises ``ValueError``.
    """
    found = [m for m in model.modules() if isinstance(m, CLIPTextEmbeddings)]
    if len(found) != 1:
        raise TypeError(f"stretch_text_positions needs a CLIP with one text tower; {type(model).__name__} has "
                        f"{len(found)}")
    embeddings = found[0]
    old = embeddings.position_embedding.weight
    length = old.shape[0]
    if positions == length:
        return model
    if positions < length:
        raise ValueError(f"cannot stretch to {positions} text positions: the model already has {length}")
    if not 0 <= keep < length or length < 2:
        raise ValueError(f"keep={keep} text positions must be in 0..{length - 1} (the model has {length})")
    with torch.no_grad():
        table = old.detach().double()
        where = keep + torch.arange(positions - keep, dtype=torch.float64) * (length - keep) / (positions - keep)
        low = where.floor().long().clamp(max=length - 2)  # past the last row: extrapolate the last step
        frac = (where - low)[:, None]
        rows = table[low] * (1 - frac) + table[low + 1] * frac
        new = nn.Embedding(positions, old.shape[1], device=old.device, dtype=old.dtype)
        new.weight.copy_(torch.cat([table[:keep], rows]).to(old.dtype))
    new.weight.requires_grad_(old.requires_grad)
    embeddings.position_embedding = new
    embeddings.position_ids = torch.arange(positions, device=embeddings.position_ids.device).expand((1, -1))
    configs = [model.config, getattr(model.config, "text_config", None)]
    configs += [m.config for m in model.modules() if isinstance(getattr(m, "config", None), CLIPTextConfig)]
    for config in configs:
        if isinstance(config, CLIPTextConfig):
            config.max_position_embeddings = positions
    if isinstance(model.config, CLIPMoEConfig):
        model.config.upcycling_info = {**(model.config.upcycling_info or {}), "text_positions": positions}
    return model
