"""Routing analysis of a CLIP-MoE: which experts the tokens of each tower go to, layer by layer.

`collect_routing` runs the towers of a `CLIPMoEModel` (or a single `CLIPMoEVisionModel` / `CLIPMoETextModel`)
with ``output_router_logits=True`` and keeps, per tower, the router logits of every MoE layer as a
(layers, items, tokens, experts) tensor together with a mask of the real tokens (every image token; text tokens
up to and including the end-of-text token, so padding is left out). On that `TowerRouting`:

- `TowerRouting.load`: (layers, experts) fraction of the top-k assignments each expert receives
  (`clipmoe_vlm.losses.expert_load`; each row sums to 1);
- `TowerRouting.entropy`: mean per-token router entropy per layer, in nats (at most log E);
- `TowerRouting.top1_change`: for consecutive MoE layers, the fraction of tokens whose top-1 expert index differs
  (experts of different layers are different modules: this measures how much the routing pattern moves).

`plot_expert_usage` draws the load as a layers x experts heatmap per tower, `plot_patch_experts` draws images next
to the grid of their patch tokens coloured by top-1 expert for a few layers, `routing_summary` /
`format_routing_summary` give the numbers as JSON and as text, and `analyze_routing` does all of it into a folder
(``expert_usage.png``, ``patch_experts.png``, ``routing.json``, ``summary.txt``). Plots use matplotlib's
object-oriented API with the Agg canvas (no pyplot, no global backend switch); matplotlib is imported only
when plotting.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..losses import expert_load
from ..modeling_clip_moe import CLIPMoEModel, CLIPMoETextModel, CLIPMoEVisionModel

__all__ = [
    "TowerRouting",
    "analyze_routing",
    "collect_routing",
    "default_map_layers",
    "format_routing_summary",
    "plot_expert_usage",
    "plot_patch_experts",
    "routing_summary",
    "text_token_mask",
]

PathLike = str | os.PathLike[str]


@dataclass
class TowerRouting:
    """Router logits of one tower over a set of inputs.

    ``layers``: encoder-layer index of each MoE layer; ``logits``: (L, N, S, E) fp32; ``mask``: (N, S) bool, the
    real tokens; ``top_k``/``num_experts``: the tower's routing configuration.
    """

    tower: str
    layers: list[int]
    logits: torch.Tensor
    mask: torch.Tensor
    top_k: int
    num_experts: int

    def __post_init__(self) -> None:
        num_layers, n, s, e = self.logits.shape
        if num_layers != len(self.layers) or tuple(self.mask.shape) != (n, s) or e != self.num_experts:
            raise ValueError(f"{self.tower}: logits {tuple(self.logits.shape)}, mask {tuple(self.mask.shape)}, "
                             f"{len(self.layers)} layers and {self.num_experts} experts disagree")

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def load(self) -> torch.Tensor:
        """(L, E): fraction of the top-k assignments of the real tokens each expert receives; rows sum to 1."""
        num_layers, n, s, e = self.logits.shape
        return expert_load(self.logits.reshape(num_layers, n * s, e), self.top_k, self.mask.float())

    def entropy(self) -> torch.Tensor:
        """(L,): mean per-token entropy (nats) of the router's softmax over the real tokens."""
        probs = self.logits.softmax(dim=-1)
        h = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)  # (L, N, S)
        w = self.mask.float()
        return (h * w).sum(dim=(1, 2)) / w.sum().clamp_min(1.0)

    def top1(self) -> torch.Tensor:
        """(L, N, S) top-1 expert index of every token."""
        return self.logits.argmax(dim=-1)

    def top1_change(self) -> list[float]:
        """For each pair of consecutive MoE layers, the fraction of real tokens whose top-1 expert differs."""
        top1 = self.top1()
        w = self.mask.float()
        return [float(((top1[i] != top1[i + 1]).float() * w).sum() / w.sum().clamp_min(1.0))
                for i in range(len(self.layers) - 1)]

    def layer_position(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not an MoE layer of the {self.tower} tower; MoE layers: "
                             f"{self.layers}")
        return self.layers.index(layer)


def text_token_mask(input_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """(B, S) bool: tokens up to and including the end-of-text token. ``eos_token_id == 2`` is transformers'
    convention for the OpenAI vocabulary, where the end-of-text token is the highest id in the row."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    if eos_token_id == 2:
        end = input_ids.argmax(dim=-1)
    else:
        is_eos = input_ids == eos_token_id
        end = torch.where(is_eos.any(dim=-1), is_eos.int().argmax(dim=-1),
                          torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1))
    return positions[None] <= end[:, None]


def _towers(model) -> dict[str, torch.nn.Module]:
    if isinstance(model, CLIPMoEModel):
        return {"vision": model.vision_model, "text": model.text_model}
    if isinstance(model, CLIPMoEVisionModel):
        return {"vision": model}
    if isinstance(model, CLIPMoETextModel):
        return {"text": model}
    raise TypeError(f"routing analysis needs a CLIP-MoE model (CLIPMoEModel, CLIPMoEVisionModel or "
                    f"CLIPMoETextModel), got {type(model).__name__}")


@torch.no_grad()
def _run_tower(tower, name: str, inputs: torch.Tensor, *, batch_size: int, device: torch.device, bf16: bool,
               progress: bool) -> TowerRouting:
    config = tower.config
    layers = config.moe_layer_indices()
    chunks = []
    key = "pixel_values" if name == "vision" else "input_ids"
    for start in tqdm(range(0, inputs.shape[0], batch_size), desc=f"route {name}", disable=not progress,
                      leave=False):
        batch = inputs[start:start + batch_size].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = tower(**{key: batch}, output_router_logits=True)
        logits = out.router_logits
        if not logits or len(logits) != len(layers):
            raise RuntimeError(f"the {name} tower returned {len(logits or ())} router logits for MoE layers {layers}")
        seq = out.last_hidden_state.shape[1]
        chunks.append(torch.stack([r.float().reshape(batch.shape[0], seq, -1).cpu() for r in logits]))
    logits = torch.cat(chunks, dim=1)
    if name == "vision":
        mask = torch.ones(logits.shape[1:3], dtype=torch.bool)
    else:
        mask = text_token_mask(inputs, config.eos_token_id)
    return TowerRouting(name, layers, logits, mask, int(config.top_k), int(config.num_experts))


def collect_routing(model, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None, *,
                    batch_size: int = 32, device: str | torch.device | None = None, bf16: bool = False,
                    progress: bool = True) -> dict[str, TowerRouting]:
    """Router logits of the towers that get an input (``"vision"`` for ``pixel_values``, ``"text"`` for
    ``input_ids``) and have MoE layers. ``device`` moves the model there (None: where it is). The model is put in
    eval mode for the run and its mode restored."""
    towers = _towers(model)
    inputs = {"vision": pixel_values, "text": input_ids}
    wanted = {name: tower for name, tower in towers.items() if inputs[name] is not None}
    if not wanted:
        raise ValueError(f"collect_routing: give pixel_values and/or input_ids for the {'/'.join(towers)} tower(s) "
                         f"of {type(model).__name__}")
    if device is not None:
        model.to(device)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        result = {name: _run_tower(tower, name, inputs[name], batch_size=batch_size, device=device, bf16=bf16,
                                   progress=progress)
                  for name, tower in wanted.items() if tower.config.moe_layer_indices()}
    finally:
        model.train(was_training)
    if not result:
        raise ValueError(f"{type(model).__name__} has no MoE layer in its {'/'.join(wanted)} tower(s)")
    return result


# --------------------------------------------------------------------------------------------------------------
# Numbers


def routing_summary(routing: Mapping[str, TowerRouting]) -> dict[str, Any]:
    """JSON-ready statistics per tower: ``layers``, ``num_experts``, ``top_k``, ``num_items``, ``num_tokens``,
    ``load`` (L x E, rows sum to 1), ``entropy`` (L, nats), ``max_entropy`` (log E) and ``top1_change``
    (``{"from_layer", "to_layer", "fraction"}`` per pair of consecutive MoE layers)."""
    towers = {}
    for name, r in routing.items():
        change = r.top1_change()
        towers[name] = {
            "layers": list(r.layers),
            "num_experts": r.num_experts,
            "top_k": r.top_k,
            "num_items": int(r.logits.shape[1]),
            "num_tokens": r.num_tokens,
            "load": [[round(float(v), 6) for v in row] for row in r.load()],
            "entropy": [round(float(v), 6) for v in r.entropy()],
            "max_entropy": math.log(r.num_experts),
            "top1_change": [{"from_layer": a, "to_layer": b, "fraction": round(f, 6)}
                            for a, b, f in zip(r.layers, r.layers[1:], change)],
        }
    return {"towers": towers}


def format_routing_summary(summary: Mapping[str, Any]) -> str:
    """The summary of `routing_summary` as a short text table per tower."""
    lines = []
    for name, t in summary["towers"].items():
        lines.append(f"{name} tower: {len(t['layers'])} MoE layers, {t['num_experts']} experts, top-{t['top_k']}, "
                     f"{t['num_items']} inputs, {t['num_tokens']} routed tokens")
        header = "load per expert (share of top-k slots)"
        width = max(len(header), 6 * t["num_experts"])
        lines.append(f"  {'layer':>5}  {header:<{width}}  entropy (max {t['max_entropy']:.3f})  "
                     "top-1 changed vs previous MoE layer")
        changes = {c["to_layer"]: c["fraction"] for c in t["top1_change"]}
        for layer, load, h in zip(t["layers"], t["load"], t["entropy"]):
            load_text = " ".join(f"{v:5.3f}" for v in load)
            change = f"{changes[layer]:.3f}" if layer in changes else "-"
            lines.append(f"  {layer:>5}  {load_text:<{width}}  {h:<{len('entropy (max 0.000)')}.3f}  {change}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------------------
# Plots


def _expert_colors(num_experts: int):
    import matplotlib
    from matplotlib.colors import ListedColormap

    base = "tab10" if num_experts <= 10 else "tab20"
    if num_experts <= 20:
        colors = matplotlib.colormaps[base].colors[:num_experts]
    else:
        colors = matplotlib.colormaps["turbo"](torch.linspace(0, 1, num_experts).numpy())
    return ListedColormap(colors, name="experts")


def plot_expert_usage(routing: Mapping[str, TowerRouting], path: PathLike) -> Path:
    """Heatmap per tower: MoE layers (rows) x experts (columns), the share of top-k assignments; PNG at ``path``."""
    from matplotlib.figure import Figure

    names = list(routing)
    if not names:
        raise ValueError("plot_expert_usage: no tower to plot")
    max_layers = max(len(r.layers) for r in routing.values())
    max_experts = max(r.num_experts for r in routing.values())
    fig = Figure(figsize=(len(names) * (2.2 + 0.55 * max_experts), 1.6 + 0.4 * max_layers), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        r = routing[name]
        load = r.load().numpy()
        im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(load.max()), 1e-6))
        ax.set_title(f"{name} tower (top-{r.top_k} of {r.num_experts})")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(r.num_experts))
        ax.set_yticks(range(len(r.layers)), [str(i) for i in r.layers])
        if load.size <= 400:
            for i in range(load.shape[0]):
                for j in range(load.shape[1]):
                    ax.text(j, i, f"{load[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if load[i, j] < 0.6 * load.max() else "black")
        fig.colorbar(im, ax=ax, label="share of top-k assignments")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _patch_grid(r: TowerRouting) -> int:
    patches = r.logits.shape[2] - 1  # token 0 is the class token
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{r.tower} tower: {patches} patch tokens do not form a square grid")
    return side


def plot_patch_experts(images: Sequence[Image.Image], routing: TowerRouting, path: PathLike, *,
                       layers: Sequence[int] | None = None, max_images: int = 4) -> Path:
    """One row per image (the first ``max_images``): the image (centre-cropped square, as CLIP's transform sees
    it), then for each of ``layers`` (default: up to 4 MoE layers, evenly spaced) the patch grid coloured by each
    patch token's top-1 expert. ``routing`` is the vision tower's `TowerRouting` over the same images, in order."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if routing.tower != "vision":
        raise ValueError(f"plot_patch_experts needs the vision tower's routing, got the {routing.tower} tower's")
    side = _patch_grid(routing)
    layers = default_map_layers(routing.layers) if layers is None else list(layers)
    positions = [routing.layer_position(layer) for layer in layers]
    count = min(max_images, len(images), routing.logits.shape[1])
    if count < 1:
        raise ValueError("plot_patch_experts: no image to plot")
    top1 = routing.top1()[:, :count, 1:].reshape(len(routing.layers), count, side, side).numpy()
    cmap = _expert_colors(routing.num_experts)
    fig = Figure(figsize=(2.0 * (1 + len(layers)), 2.0 * count + 0.6), layout="constrained")
    axes = fig.subplots(count, 1 + len(layers), squeeze=False)
    for row in range(count):
        image = images[row].convert("RGB")
        square = ImageOps.fit(image, (min(image.size),) * 2, method=Image.Resampling.BICUBIC)
        axes[row, 0].imshow(square)
        axes[row, 0].set_title(f"image {row}", fontsize=8)
        for col, (layer, pos) in enumerate(zip(layers, positions), start=1):
            axes[row, col].imshow(top1[pos, row], cmap=cmap, vmin=-0.5, vmax=routing.num_experts - 0.5,
                                  interpolation="nearest")
            axes[row, col].set_title(f"layer {layer}", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=cmap(e), label=f"expert {e}") for e in range(routing.num_experts)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(routing.num_experts, 8), fontsize=8)
    fig.suptitle("top-1 expert of each patch token", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def default_map_layers(layers: Sequence[int], count: int = 4) -> list[int]:
    """Up to ``count`` of ``layers``, evenly spaced, first and last included."""
    layers = list(layers)
    if len(layers) <= count:
        return layers
    picks = sorted({round(i * (len(layers) - 1) / (count - 1)) for i in range(count)})
    return [layers[i] for i in picks]


# --------------------------------------------------------------------------------------------------------------
# All of it


def analyze_routing(model, images: Sequence[Image.Image], transform, output_dir: PathLike, *,
                    captions: Sequence[str] | None = None, tokenizer=None, layers: Sequence[int] | None = None,
                    num_maps: int = 4, batch_size: int = 32, device: str | torch.device | None = None,
                    bf16: bool = False, progress: bool = True) -> dict[str, Any]:
    """Routes ``images`` (and ``captions``, tokenized with ``tokenizer``, for the text tower of a `CLIPMoEModel`)
    and writes into ``output_dir``: ``expert_usage.png``, ``patch_experts.png`` (the first ``num_maps`` images at
    ``layers``, default up to 4 evenly spaced MoE layers), ``routing.json`` and ``summary.txt``. Returns the
    summary (`routing_summary` plus ``num_images``, ``num_captions``, ``map_layers`` and ``files``)."""
    if not images:
        raise ValueError("analyze_routing: no images")
    if captions is not None and tokenizer is None:
        raise ValueError("analyze_routing: captions need a tokenizer")
    tensors = []
    for position, image in enumerate(images):
        try:
            tensors.append(transform(image.convert("RGB")))
        except OSError as error:  # a lazily opened file that is truncated fails only here: say which one
            name = getattr(image, "filename", "")
            raise ValueError(f"analyze_routing: image {position}{f' ({name})' if name else ''} cannot be read: "
                             f"{error}") from error
    pixel_values = torch.stack(tensors)
    input_ids = torch.as_tensor(tokenizer(list(captions))) if captions else None
    towers = _towers(model)
    routing = collect_routing(model, pixel_values if "vision" in towers else None,
                              input_ids if "text" in towers else None, batch_size=batch_size, device=device,
                              bf16=bf16, progress=progress)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = routing_summary(routing)
    files = {"expert_usage": plot_expert_usage(routing, out / "expert_usage.png")}
    map_layers: list[int] = []
    if "vision" in routing and num_maps > 0:
        map_layers = default_map_layers(routing["vision"].layers) if layers is None else list(layers)
        files["patch_experts"] = plot_patch_experts(images, routing["vision"], out / "patch_experts.png",
                                                    layers=map_layers, max_images=num_maps)
    files["summary"] = out / "summary.txt"
    files["routing_json"] = out / "routing.json"
    summary.update(num_images=len(images), num_captions=len(captions or ()), map_layers=map_layers,
                   files={k: str(v) for k, v in files.items()})
    files["summary"].write_text(format_routing_summary(summary), encoding="utf-8")
    files["routing_json"].write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary
