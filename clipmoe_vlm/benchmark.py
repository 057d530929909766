"""Side-by-side benchmarks of the CLIP-MoE pieces (issue 7); the CLI is ``scripts/benchmark.py``.

Every figure is a ratio of contenders timed in the same run: the contenders of an item are interleaved
(round r runs A, B, C, ... once each, in a rotated order), the per-round ratio is taken, and the median over
rounds is reported, so a noisy, shared machine moves both sides of a ratio together.

Items (``--items``):

- ``moe_layer``: `CLIPMoESparseBlock` (E=4, top-2) vs a dense ``CLIPMLP`` on twice the tokens (the same FLOPs),
  and the naive per-expert loop (transformers' former Mixtral dispatch: ``torch.where`` on the one-hot routing
  mask, index, compute, ``index_add_``) as the peer; fp32 and bf16 (CPU autocast). Target: MoE <= 1.05x dense.
- ``tower``: `CLIPMoEVisionModel` vs ``CLIPVisionModel`` of the same config, images/s, against the FLOP-ideal
  time ratio (analytic FLOPs, `vision_tower_flops`). Target: efficiency (ideal / measured time ratio) >= 0.95.
- ``train``: router-tuning and MCL-stage steps of a CLIP-MoE; achieved FLOP/s (forward+backward FLOPs from
  ``FlopCounterMode``) over the peak fp32 matmul FLOP/s measured in the same run. Target >= 0.5.
- ``generate``: LLaVA (Llama LM from a config) tokens/s with a CLIP-MoE tower vs a dense tower. Target >= 0.95.
- ``data``: `upcycle.data.ImageTextDataset` + `collate_image_text` through a 2-worker DataLoader, samples/s,
  vs the samples/s an MCL training step of the tiny Shapes CLIP-MoE consumes at batch 32. Target >= 1.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import clipmoe_vlm`; must precede torch's import

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ITEMS",
    "NaivePerExpertMoE",
    "interleaved",
    "machine_info",
    "moe_layer_flops",
    "run_benchmarks",
    "vision_tower_flops",
]

ITEMS = ("moe_layer", "tower", "train", "generate", "data")

TARGETS = {
    "moe_layer": "moe_time / dense_equal_flops_time <= 1.05",
    "tower": "efficiency = ideal_time_ratio / measured_time_ratio >= 0.95",
    "train": "achieved_flops_per_s / peak_matmul_flops_per_s >= 0.50 (fp32)",
    "generate": "moe_tokens_per_s / dense_tokens_per_s >= 0.95",
    "data": "loader_samples_per_s / train_step_samples_per_s >= 1.0",
}

# (name, tokens per image, hidden, intermediate, image size, patch, layers, heads)
VIT_SIZES = {
    "vit-b16": dict(seq=197, hidden=768, intermediate=3072, image_size=224, patch_size=16, layers=12, heads=12),
    "vit-l14-336": dict(seq=577, hidden=1024, intermediate=4096, image_size=336, patch_size=14, layers=24,
                        heads=16),
    "tiny": dict(seq=65, hidden=128, intermediate=512, image_size=64, patch_size=8, layers=2, heads=4),
}


# ------------------------------------------------------------------------------------------------ timing


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                reference: str | None = None) -> dict:
    """Times ``contenders`` interleaved: ``warmup`` untimed rounds, then ``repeats`` rounds each calling every
    contender once (the order rotates every round). Returns per-contender median/min seconds and, for every
    contender, the median over rounds of its time divided by ``reference``'s time in the same round."""
    names = list(contenders)
    reference = reference or names[0]
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            _sync()
            t0 = time.perf_counter()
            contenders[name]()
            _sync()
            times[name].append(time.perf_counter() - t0)
    out = {"median_s": {n: statistics.median(v) for n, v in times.items()},
           "min_s": {n: min(v) for n, v in times.items()},
           "times_s": times,
           "ratio_to_" + reference: {n: statistics.median([a / b for a, b in zip(times[n], times[reference])])
                                     for n in names}}
    return out


def machine_info() -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "isa": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni",
                                                "avx_vnni", "fma")),
        "bf16_native": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "load_average": [round(x, 2) for x in load],
        "cuda": torch.cuda.is_available(),
    }


# ------------------------------------------------------------------------------------------------ FLOPs


def moe_layer_flops(tokens: int, hidden: int, intermediate: int, num_experts: int, top_k: int,
                    dense: bool = False) -> int:
    """Matmul FLOPs (2 per multiply-add, biases and activations not counted) of one FFN over ``tokens``.

    ``dense=True``: a CLIP MLP (fc1 + fc2). Otherwise the sparse block: router + ``top_k`` experts per token."""
    ffn = 2 * tokens * hidden * intermediate * 2
    if dense:
        return ffn
    return 2 * tokens * hidden * num_experts + top_k * ffn


def vision_tower_flops(config, batch: int, moe: bool) -> dict:
    """Matmul FLOPs of one ``CLIPVisionModel`` / `CLIPMoEVisionModel` forward, per part:
    ``patch`` (the patch-embedding convolution), ``attention`` (q, k, v, out projections and the two
    S x S products), ``ffn`` (dense MLPs, or routers + k experts in MoE layers) and ``total``."""
    h, i, p = config.hidden_size, config.intermediate_size, config.patch_size
    n_patch = (config.image_size // p) ** 2
    s = n_patch + 1
    patch = 2 * batch * n_patch * config.num_channels * p * p * h
    attention = config.num_hidden_layers * batch * (4 * 2 * s * h * h + 2 * 2 * s * s * h)
    ffn = 0
    for layer in range(config.num_hidden_layers):
        is_moe = moe and config.is_moe_layer(layer)
        ffn += moe_layer_flops(batch * s, h, i, getattr(config, "num_experts", 1), getattr(config, "top_k", 1),
                               dense=not is_moe)
    return {"patch": patch, "attention": attention, "ffn": ffn, "total": patch + attention + ffn}


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul FLOPs of ``fn()`` by ``FlopCounterMode``. PyTorch registers no formula for the CPU flash-attention
    kernel that SDPA dispatches to on the CPU (its S x S products would count 0), so its forward and backward
    get the formulas PyTorch uses for the CUDA attention kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ the peer


class NaivePerExpertMoE(nn.Module):
    """transformers' former Mixtral dispatch over the same router and expert tensors as a `CLIPMoESparseBlock`:
    for each expert, ``torch.where`` on the one-hot routing mask, index the tokens, compute, ``index_add_``.
    With a capacity factor, the assignments `plan_routing` drops are masked out (``plan.kept``)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from .moe import plan_routing

        block = self.block
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        logits, weights, indices = block.gate(x)
        mask = F.one_hot(indices, block.num_experts)  # (T, k, E)
        if block.capacity_factor is not None:
            priority = (logits.float().softmax(-1).amax(-1) if block.batch_priority_routing else None)
            kept = plan_routing(weights, indices, block.num_experts, block.capacity_factor, priority).kept
            mask = mask * kept[..., None]
        mask = mask.permute(2, 1, 0)  # (E, k, T)
        out = None
        for e in range(block.num_experts):
            idx, top_x = torch.where(mask[e])
            y = block.experts.expert_forward(e, x[top_x]) * weights[top_x, idx, None].to(x.dtype)
            if out is None:
                out = torch.zeros(x.shape, dtype=y.dtype, device=x.device)
            out.index_add_(0, top_x, y.to(out.dtype))
        return out.to(hidden_states.dtype).view(batch, seq, hidden)


def padded_bmm_grouped_forward(experts, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Candidate replacement of `CLIPMoEExperts.grouped_forward` off the grouped-GEMM path: the sorted tokens
    are copied into zero-padded (E, max(counts), H) buffers and each projection is one ``torch.baddbmm`` over
    all experts (2 matmul calls instead of 2E, and E independent GEMMs that the BLAS can spread over threads),
    at the price of computing the padding rows. Same values as the loop (padding rows are dropped)."""
    num_experts, cmax = len(counts), max(counts)
    if cmax == 0:
        return x_sorted.new_zeros(x_sorted.shape)
    valid = torch.arange(cmax, device=x_sorted.device)[None, :] < torch.tensor(counts, device=x_sorted.device)[:, None]
    buf = x_sorted.new_zeros(num_experts, cmax, x_sorted.shape[1])
    buf[valid] = x_sorted  # row-major over (expert, slot) = the expert-sorted order
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else buf.dtype
    with torch.autocast("cpu", enabled=False):
        buf = buf.to(dtype)
        h = torch.baddbmm(experts.fc1_bias[:, None, :].to(dtype), buf, experts.fc1_weight.to(dtype).transpose(1, 2))
        h = experts.dropout(experts.activation_fn(h))
        out = torch.baddbmm(experts.fc2_bias[:, None, :].to(dtype), h, experts.fc2_weight.to(dtype).transpose(1, 2))
    return out[valid]


def with_padded_bmm(block):
    """A copy of ``block`` (sharing its parameters) whose experts run `padded_bmm_grouped_forward`."""
    import copy

    clone = copy.copy(block)
    clone._modules = dict(block._modules)
    experts = copy.copy(block.experts)
    experts.grouped_forward = lambda x, counts: padded_bmm_grouped_forward(experts, x, counts)
    clone._modules["experts"] = experts
    return clone


# ------------------------------------------------------------------------------------------------ items


def _autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def bench_moe_layer(cases: list[tuple[str, str, int, int]], dtypes: list[str], log=print) -> list[dict]:
    """``cases``: (size name, dtype, batch, repeats); cases whose dtype is not in ``dtypes`` are skipped."""
    from transformers.models.clip.modeling_clip import CLIPMLP

    from . import CLIPMoEVisionConfig
    from .moe import CLIPMoESparseBlock

    rows = []
    for size, dtype, batch, repeats in cases:
        if dtype not in dtypes:
            continue
        spec = VIT_SIZES[size]
        cfg = CLIPMoEVisionConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                                  num_hidden_layers=1, num_attention_heads=spec["heads"], num_experts=4, top_k=2)
        torch.manual_seed(0)
        moe = CLIPMoESparseBlock(cfg).eval()
        dense = CLIPMLP(cfg).eval()
        naive = NaivePerExpertMoE(moe).eval()
        candidate = with_padded_bmm(moe)
        x = torch.randn(batch, spec["seq"], spec["hidden"])
        x2 = torch.cat([x, x], dim=0)  # twice the tokens: the FLOPs of top-2
        t = batch * spec["seq"]
        flops_moe = moe_layer_flops(t, spec["hidden"], spec["intermediate"], 4, 2)
        flops_dense = moe_layer_flops(2 * t, spec["hidden"], spec["intermediate"], 4, 2, dense=True)
        def run(m, inp, dt=dtype):
            def f():
                with torch.no_grad(), _autocast(dt):
                    return m(inp)
            return f
        contenders = {"dense_2x_tokens": run(dense, x2), "moe": run(moe, x), "naive_loop": run(naive, x),
                      "moe_padded_bmm_candidate": run(candidate, x)}
        if dtype == "bf16":  # the fp32 twins, timed in the same rounds: bf16 vs fp32 on this CPU
            contenders.update({"dense_2x_tokens_fp32": run(dense, x2, "fp32"), "moe_fp32": run(moe, x, "fp32")})
        res = interleaved(contenders, repeats=repeats, reference="dense_2x_tokens")
        ratio = res["ratio_to_dense_2x_tokens"]
        row = {"size": size, "dtype": dtype, "tokens": t, "hidden": spec["hidden"],
               "intermediate": spec["intermediate"], "num_experts": 4, "top_k": 2,
               "flops_moe": flops_moe, "flops_dense_2x": flops_dense,
               "median_s": res["median_s"], "min_s": res["min_s"],
               "moe_over_dense": ratio["moe"], "naive_over_dense": ratio["naive_loop"],
               "padded_bmm_candidate_over_dense": ratio["moe_padded_bmm_candidate"],
               "moe_over_naive": statistics.median(
                   [a / b for a, b in zip(res["times_s"]["moe"], res["times_s"]["naive_loop"])]),
               "dense_gflops_per_s": flops_dense / res["median_s"]["dense_2x_tokens"] / 1e9,
               "target": "<= 1.05", "pass": ratio["moe"] <= 1.05}
        if dtype == "bf16":
            row["bf16_over_fp32_time"] = {
                name: statistics.median([a / b for a, b in zip(res["times_s"][name], res["times_s"][name + suffix])])
                for name, suffix in (("dense_2x_tokens", "_fp32"), ("moe", "_fp32"))}
        rows.append(row)
        log(f"moe_layer {size:12s} {dtype:4s} T={t:5d}  dense(2T) {res['median_s']['dense_2x_tokens']*1e3:8.1f} ms"
            f"  moe {res['median_s']['moe']*1e3:8.1f} ms  naive {res['median_s']['naive_loop']*1e3:8.1f} ms"
            f"  moe/dense {ratio['moe']:.3f} (target <= 1.05, {'ok' if row['pass'] else 'MISS'})"
            f"  naive/dense {ratio['naive_loop']:.3f}  padded-bmm candidate/dense "
            f"{ratio['moe_padded_bmm_candidate']:.3f}"
            + (f"  bf16/fp32 time: dense {row['bf16_over_fp32_time']['dense_2x_tokens']:.2f}, moe "
               f"{row['bf16_over_fp32_time']['moe']:.2f}" if dtype == "bf16" else ""))
    return rows


def _vision_configs(size: str, layers: int | None):
    from transformers import CLIPVisionConfig

    from . import CLIPMoEVisionConfig

    spec = VIT_SIZES[size]
    common = dict(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                  num_hidden_layers=layers or spec["layers"], num_attention_heads=spec["heads"],
                  image_size=spec["image_size"], patch_size=spec["patch_size"])
    return CLIPVisionConfig(**common), CLIPMoEVisionConfig(**common, num_experts=4, top_k=2)


def bench_tower(cases: list[tuple[str, int | None, int, str, int]], dtypes: list[str], log=print) -> list[dict]:
    """``cases``: (size name, layers or None for the full depth, batch, dtype, repeats)."""
    from transformers import CLIPVisionModel

    from . import CLIPMoEVisionModel

    rows = []
    for size, layers, batch, dtype, repeats in cases:
        if dtype not in dtypes:
            continue
        dcfg, mcfg = _vision_configs(size, layers)
        torch.manual_seed(0)
        dense = CLIPVisionModel(dcfg).eval()
        moe = CLIPMoEVisionModel(mcfg).eval()
        pix = torch.randn(batch, 3, dcfg.image_size, dcfg.image_size)
        fd, fm = vision_tower_flops(dcfg, batch, moe=False), vision_tower_flops(mcfg, batch, moe=True)
        ideal = fm["total"] / fd["total"]
        def run(m, dt=dtype, images=pix):
            def f():
                with torch.no_grad(), _autocast(dt):
                    return m(pixel_values=images)
            return f
        contenders = {"dense": run(dense), "moe": run(moe)}
        if dtype == "bf16":
            contenders.update({"dense_fp32": run(dense, "fp32"), "moe_fp32": run(moe, "fp32")})
        res = interleaved(contenders, repeats=repeats, reference="dense")
        measured = res["ratio_to_dense"]["moe"]
        row = {"size": size, "layers": dcfg.num_hidden_layers, "batch": batch, "dtype": dtype,
               "flops_dense": fd, "flops_moe": fm, "ideal_time_ratio": ideal,
               "median_s": res["median_s"],
               "images_per_s": {k: batch / v for k, v in res["median_s"].items()},
               "measured_time_ratio": measured, "efficiency": ideal / measured,
               "dense_gflops_per_s": fd["total"] / res["median_s"]["dense"] / 1e9,
               "target": ">= 0.95", "pass": ideal / measured >= 0.95}
        if dtype == "bf16":
            row["bf16_over_fp32_time"] = {
                name: statistics.median([a / b for a, b in zip(res["times_s"][name], res["times_s"][name + "_fp32"])])
                for name in ("dense", "moe")}
        rows.append(row)
        log(f"tower     {size:12s} {dtype:4s} L={dcfg.num_hidden_layers:2d} B={batch}  dense "
            f"{row['images_per_s']['dense']:7.2f} img/s  moe {row['images_per_s']['moe']:7.2f} img/s  "
            f"time ratio {measured:.3f} vs ideal {ideal:.3f}  efficiency {row['efficiency']:.3f} "
            f"(target >= 0.95, {'ok' if row['pass'] else 'MISS'})"
            + (f"  bf16/fp32 time: dense {row['bf16_over_fp32_time']['dense']:.2f}, moe "
               f"{row['bf16_over_fp32_time']['moe']:.2f}" if dtype == "bf16" else ""))
    return rows


def peak_matmul(n: int) -> Callable[[], object]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: torch.mm(a, b)


def _clip_moe(config, num_experts: int = 4, top_k: int = 2):
    from transformers import CLIPModel

    from upcycle import sparse_upcycle

    torch.manual_seed(0)
    return sparse_upcycle(CLIPModel(config), num_experts=num_experts, top_k=top_k)


def _train_step_fn(model, stage: str, batch: int, moe_losses: bool = True):
    from upcycle.contrastive import clip_contrastive_loss
    from upcycle.trainable import set_trainable

    from .losses import load_balancing_loss

    set_trainable(model, "router" if stage == "router" else "mcl")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    vc, tc = model.config.vision_config, model.config.text_config
    pix = torch.randn(batch, 3, vc.image_size, vc.image_size)
    ids = torch.randint(1, tc.vocab_size - 1, (batch, tc.max_position_embeddings))
    ids[:, -1] = tc.vocab_size - 1

    def step():
        out = model(input_ids=ids, pixel_values=pix, output_router_logits=moe_losses)
        loss = clip_contrastive_loss(out.image_embeds, out.text_embeds, 100.0, 0.1)
        if moe_losses and out.image_router_logits:
            loss = loss + 0.01 * load_balancing_loss(out.image_router_logits, vc.top_k)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def vit_clip_config(size: str, layers: int | None = None, text_layers: int | None = None):
    """A CLIPConfig whose vision tower is ``size`` (VIT_SIZES) and text tower CLIP's 12-layer 512-wide (77
    tokens), both depths optionally cut."""
    from transformers import CLIPConfig

    spec = VIT_SIZES[size]
    text_width = 512 if size != "tiny" else 128
    return CLIPConfig(
        vision_config=dict(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                           num_hidden_layers=layers or spec["layers"], num_attention_heads=spec["heads"],
                           image_size=spec["image_size"], patch_size=spec["patch_size"]),
        text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=text_layers or (12 if size != "tiny" else 2),
                         num_attention_heads=max(1, text_width // 64), max_position_embeddings=77,
                         eos_token_id=2),
        projection_dim=512 if size != "tiny" else 128)


def bench_train(size: str, layers: int | None, batch: int, repeats: int, peak_n: int, log=print) -> list[dict]:
    config = vit_clip_config(size, layers)
    rows = []
    for stage in ("router", "mcl"):
        model = _clip_moe(config)
        step = _train_step_fn(model, stage, batch)
        step()  # warm-up (optimizer state)
        flops = count_flops(step)
        mm = peak_matmul(peak_n)
        res = interleaved({"step": step, "peak_matmul": mm}, repeats=repeats, reference="peak_matmul")
        peak = 2 * peak_n ** 3 / res["median_s"]["peak_matmul"]
        achieved_rounds = [flops / a / (2 * peak_n ** 3 / b)
                           for a, b in zip(res["times_s"]["step"], res["times_s"]["peak_matmul"])]
        frac = statistics.median(achieved_rounds)
        row = {"stage": stage, "size": size, "vision_layers": config.vision_config.num_hidden_layers,
               "text_layers": config.text_config.num_hidden_layers, "batch": batch,
               "flops_per_step": flops, "step_median_s": res["median_s"]["step"],
               "achieved_gflops_per_s": flops / res["median_s"]["step"] / 1e9,
               "peak_matmul_n": peak_n, "peak_gflops_per_s": peak / 1e9,
               "fraction_of_peak": frac, "target": ">= 0.50", "pass": frac >= 0.5}
        rows.append(row)
        log(f"train     {stage:6s} {size:12s} B={batch}  {flops/1e9:8.1f} GFLOP/step  step "
            f"{row['step_median_s']*1e3:8.1f} ms  achieved {row['achieved_gflops_per_s']:6.1f} GFLOP/s  peak "
            f"{row['peak_gflops_per_s']:6.1f} GFLOP/s  fraction {frac:.3f} (target >= 0.50, "
            f"{'ok' if row['pass'] else 'MISS'})")
        del model
    return rows


def _llava(vision_config, lm: dict):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    n_patch = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config,
                         text_config=LlamaConfig(vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                 max_position_embeddings=2048, **lm),
                         image_token_id=1000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=n_patch)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), n_patch


def bench_generate(vision_size: str, vision_layers: int, lm: dict, new_tokens: int, repeats: int,
                   name: str = "", log=print) -> dict:
    dcfg, mcfg = _vision_configs(vision_size, vision_layers)
    dense, n_patch = _llava(dcfg, lm)
    moe, _ = _llava(mcfg, lm)
    moe.model.language_model.load_state_dict(dense.model.language_model.state_dict())  # same LM
    moe.lm_head.load_state_dict(dense.lm_head.state_dict())
    moe.model.multi_modal_projector.load_state_dict(dense.model.multi_modal_projector.state_dict())
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 900, (1, 16), generator=g)
    ids = torch.cat([torch.ones(1, 1, dtype=torch.long), torch.full((1, n_patch), 1000), text], dim=1)
    pix = torch.randn(1, 3, dcfg.image_size, dcfg.image_size, generator=g)

    def run(m):
        def f():
            with torch.no_grad():
                return m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  use_cache=True, pad_token_id=0)
        return f
    res = interleaved({"dense": run(dense), "moe": run(moe)}, repeats=repeats, reference="dense")
    tok_s = {k: new_tokens / v for k, v in res["median_s"].items()}
    ratio = 1.0 / res["ratio_to_dense"]["moe"]
    # FLOP-ideal ratio: LM ~ 2 * (non-embedding params + lm_head) per token processed, plus the tower once.
    lm_model = dense.model.language_model
    lm_params = sum(p.numel() for p in lm_model.parameters()) - lm_model.embed_tokens.weight.numel() \
        + dense.lm_head.weight.numel()
    lm_flops = 2 * lm_params * (ids.shape[1] + new_tokens)
    tower_d = vision_tower_flops(dcfg, 1, moe=False)["total"]
    tower_m = vision_tower_flops(mcfg, 1, moe=True)["total"]
    ideal = (tower_d + lm_flops) / (tower_m + lm_flops)
    row = {"case": name, "vision": vision_size, "vision_layers": vision_layers, "lm": lm,
           "prompt_tokens": ids.shape[1],
           "new_tokens": new_tokens, "median_s": res["median_s"], "tokens_per_s": tok_s,
           "flops_lm_approx": lm_flops, "flops_tower_dense": tower_d, "flops_tower_moe": tower_m,
           "tower_share_of_dense_flops": tower_d / (tower_d + lm_flops), "flop_ideal_tokens_per_s_ratio": ideal,
           "moe_over_dense_tokens_per_s": ratio, "target": ">= 0.95", "pass": ratio >= 0.95}
    log(f"generate  {name}: {vision_size}/L{vision_layers} + Llama h{lm['hidden_size']} L{lm['num_hidden_layers']}  "
        f"{new_tokens} new tokens  dense {tok_s['dense']:7.1f} tok/s  moe {tok_s['moe']:7.1f} tok/s  ratio "
        f"{ratio:.3f} (FLOP-ideal {ideal:.3f}, tower share {row['tower_share_of_dense_flops']:.1%}; "
        f"target >= 0.95, {'ok' if row['pass'] else 'MISS'})")
    return row


def write_image_world(root: Path, n: int, image_size: int = 64) -> Path:
    """``n`` PNG images of random coloured shapes and a captions.jsonl beside them (a stand-in Shapes world)."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    lines = []
    for i in range(n):
        img = Image.new("RGB", (image_size, image_size), rng.choice(["white", "black", "gray"]))
        draw = ImageDraw.Draw(img)
        c = rng.choice(colors)
        x0, y0 = rng.randrange(image_size // 2), rng.randrange(image_size // 2)
        box = (x0, y0, x0 + rng.randrange(8, image_size // 2), y0 + rng.randrange(8, image_size // 2))
        shape = rng.choice(["circle", "square"])
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=c)
        path = root / "images" / f"{i:05d}.png"
        img.save(path)
        lines.append(json.dumps({"image": f"images/{i:05d}.png", "caption": f"a {c} {shape} on a plain background"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


def bench_data(num_images: int, batch: int, workers: int, repeats: int, data: str | None = None,
               log=print) -> dict:
    from torch.utils.data import DataLoader

    from upcycle.data import ImageTextDataset, clip_image_transform, collate_image_text, open_clip_tokenizer
    from upcycle.sources import tiny_clip_config

    config = tiny_clip_config()
    with tempfile.TemporaryDirectory() as tmp:
        source = data or str(write_image_world(Path(tmp), num_images, config.vision_config.image_size))
        ds = ImageTextDataset([source], clip_image_transform(config.vision_config.image_size),
                              open_clip_tokenizer(config.text_config.max_position_embeddings),
                              max_samples=num_images)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=collate_image_text,
                            num_workers=workers, persistent_workers=workers > 0,
                            prefetch_factor=2 if workers else None, drop_last=True,
                            generator=torch.Generator().manual_seed(0))
        batches_per_round = max(1, len(ds) // batch)

        def epoch():
            n = 0
            for b in loader:
                n += b["pixel_values"].shape[0]
            return n

        model = _clip_moe(config)
        step = _train_step_fn(model, "mcl", batch)
        step()
        res = interleaved({"loader_epoch": epoch, "train_step": step}, repeats=repeats, reference="train_step")
        loader_sps = batches_per_round * batch / res["median_s"]["loader_epoch"]
        step_sps = batch / res["median_s"]["train_step"]
        rounds = [(batches_per_round * batch / a) / (batch / b)
                  for a, b in zip(res["times_s"]["loader_epoch"], res["times_s"]["train_step"])]
        ratio = statistics.median(rounds)
        row = {"images": len(ds), "batch": batch, "workers": workers, "image_size": config.vision_config.image_size,
               "source": "given" if data else "generated PNGs", "loader_samples_per_s": loader_sps,
               "train_step_samples_per_s": step_sps, "loader_over_step": ratio, "target": ">= 1.0",
               "pass": ratio >= 1.0}
        log(f"data      {len(ds)} images, batch {batch}, {workers} workers  loader {loader_sps:8.1f} samples/s  "
            f"MCL step {step_sps:8.1f} samples/s  ratio {ratio:.2f} (target >= 1, {'ok' if row['pass'] else 'MISS'})")
    return row


def profile_moe(size: str, batch: int, dtype: str, top: int = 12) -> list[dict]:
    """The ops that cost the time in one `CLIPMoESparseBlock` forward (torch.profiler, CPU self time)."""
    from torch.profiler import ProfilerActivity, profile

    from . import CLIPMoEVisionConfig
    from .moe import CLIPMoESparseBlock

    spec = VIT_SIZES[size]
    cfg = CLIPMoEVisionConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                              num_hidden_layers=1, num_attention_heads=spec["heads"], num_experts=4, top_k=2)
    block = CLIPMoESparseBlock(cfg).eval()
    x = torch.randn(batch, spec["seq"], spec["hidden"])
    with torch.no_grad(), _autocast(dtype):
        block(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                block(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 2e3, "share": e.self_cpu_time_total / total,
             "calls": e.count // 2} for e in events[:top]]


def _label_modules(model: nn.Module, prefix: str) -> list:
    """Wraps every encoder layer's ``self_attn`` / ``mlp`` (and an MoE block's ``gate`` / ``experts``) in a
    ``record_function`` range named after its part, so the profiler can split a tower's time by part."""
    handles = []
    for name, module in model.named_modules():
        part = name.rsplit(".", 1)[-1]
        if part not in ("self_attn", "mlp", "gate"):
            continue
        label = f"{prefix}::{'ffn' if part == 'mlp' else part}"

        def pre(mod, args, label=label):
            mod._bench_range = torch.autograd.profiler.record_function(label)
            mod._bench_range.__enter__()

        def post(mod, args, output):
            mod._bench_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def profile_tower(size: str, layers: int | None, batch: int, dtype: str = "fp32", rounds: int = 2) -> dict:
    """Where a dense and a CLIP-MoE vision tower spend their time (torch.profiler, CPU, the two towers run
    alternately in one session): milliseconds per forward and per part (self_attn, ffn; the MoE's gate inside its
    ffn), their ratios, and the top ops by self time of both towers together."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import CLIPVisionModel

    from . import CLIPMoEVisionModel

    dcfg, mcfg = _vision_configs(size, layers)
    torch.manual_seed(0)
    pix = torch.randn(batch, 3, dcfg.image_size, dcfg.image_size)
    models = {"dense": CLIPVisionModel(dcfg).eval(), "moe": CLIPMoEVisionModel(mcfg).eval()}
    handles = [h for name, model in models.items() for h in _label_modules(model, name)]
    with torch.no_grad(), _autocast(dtype):
        for model in models.values():
            model(pixel_values=pix)
        with profile(activities=[ProfilerActivity.CPU]) as prof:  # interleaved: dense, moe, dense, moe, ...
            for _ in range(rounds):
                for name, model in models.items():
                    with torch.autograd.profiler.record_function(f"{name}::forward"):
                        model(pixel_values=pix)
    for h in handles:
        h.remove()
    events = prof.key_averages()
    out = {}
    for name in models:
        out[name] = {"part_ms": {e.key.split("::", 1)[1]: e.cpu_time_total / rounds / 1e3 for e in events
                                 if e.key.startswith(f"{name}::")}}
    out["top_ops_both"] = [{"op": e.key, "self_ms": e.self_cpu_time_total / rounds / 1e3}
                           for e in sorted((e for e in events if "::" not in e.key or e.key.startswith("aten::")),
                                           key=lambda e: e.self_cpu_time_total, reverse=True)[:8]]
    out["ffn_time_ratio_moe_over_dense"] = out["moe"]["part_ms"]["ffn"] / out["dense"]["part_ms"]["ffn"]
    out["attention_time_ratio_moe_over_dense"] = (out["moe"]["part_ms"]["self_attn"]
                                                  / out["dense"]["part_ms"]["self_attn"])
    return out


# ------------------------------------------------------------------------------------------------ report


def markdown_table(result: dict) -> str:
    """One Markdown table of every measured ratio of a `run_benchmarks` result (the table of
    docs/performance.md)."""
    lines = ["| item | case | measured | ratio | target | |", "| --- | --- | --- | --- | --- | --- |"]

    def add(item, case, measured, ratio, target, ok):
        lines.append(f"| {item} | {case} | {measured} | {ratio} | {target} | {'ok' if ok else '**miss**'} |")

    items = result["items"]
    for r in items.get("moe_layer", []):
        m = r["median_s"]
        extra = (f"; bf16/fp32 time: dense {r['bf16_over_fp32_time']['dense_2x_tokens']:.2f}x, MoE "
                 f"{r['bf16_over_fp32_time']['moe']:.2f}x" if "bf16_over_fp32_time" in r else "")
        add("MoE layer", f"{r['size']} {r['dtype']}, {r['tokens']} tokens",
            f"dense(2T) {m['dense_2x_tokens']*1e3:.0f} ms, MoE {m['moe']*1e3:.0f} ms, naive loop "
            f"{m['naive_loop']*1e3:.0f} ms; naive/dense {r['naive_over_dense']:.3f}, padded-bmm/dense "
            f"{r['padded_bmm_candidate_over_dense']:.3f}{extra}",
            f"MoE/dense {r['moe_over_dense']:.3f}", "<= 1.05", r["pass"])
    for r in items.get("tower", []):
        extra = (f"; bf16/fp32 time: dense {r['bf16_over_fp32_time']['dense']:.2f}x, MoE "
                 f"{r['bf16_over_fp32_time']['moe']:.2f}x" if "bf16_over_fp32_time" in r else "")
        add("vision tower", f"{r['size']} {r['dtype']}, {r['layers']} layers, batch {r['batch']}",
            f"dense {r['images_per_s']['dense']:.2f} img/s, MoE {r['images_per_s']['moe']:.2f} img/s; time ratio "
            f"{r['measured_time_ratio']:.3f} vs FLOP-ideal {r['ideal_time_ratio']:.3f}{extra}",
            f"efficiency {r['efficiency']:.3f}", ">= 0.95", r["pass"])
    for r in items.get("train", []):
        add("training step", f"{r['stage']}, {r['size']} ({r['vision_layers']}+{r['text_layers']} layers), "
            f"batch {r['batch']}, fp32",
            f"{r['flops_per_step']/1e9:.0f} GFLOP/step in {r['step_median_s']*1e3:.0f} ms = "
            f"{r['achieved_gflops_per_s']:.1f} GFLOP/s; peak {r['peak_matmul_n']}^3 matmul "
            f"{r['peak_gflops_per_s']:.1f} GFLOP/s",
            f"{r['fraction_of_peak']:.2f} of peak", ">= 0.50", r["pass"])
    for r in items.get("generate", []):
        add("generation", f"{r['case']}: {r['vision']} x{r['vision_layers']} layers + Llama "
            f"h{r['lm']['hidden_size']} x{r['lm']['num_hidden_layers']}, {r['new_tokens']} new tokens",
            f"dense {r['tokens_per_s']['dense']:.1f} tok/s, MoE {r['tokens_per_s']['moe']:.1f} tok/s; tower share "
            f"{r['tower_share_of_dense_flops']:.1%}, FLOP-ideal {r['flop_ideal_tokens_per_s_ratio']:.3f}",
            f"{r['moe_over_dense_tokens_per_s']:.3f}", ">= 0.95", r["pass"])
    r = items.get("data")
    if r:
        add("data pipeline", f"{r['images']} {r['image_size']}px PNGs, batch {r['batch']}, {r['workers']} workers",
            f"loader {r['loader_samples_per_s']:.0f} samples/s, MCL step (tiny CLIP-MoE) "
            f"{r['train_step_samples_per_s']:.0f} samples/s", f"{r['loader_over_step']:.1f}", ">= 1", r["pass"])
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ driver


_LM_100M = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=16)


def plan(quick: bool) -> dict:
    """The sizes of every item, full or quick. bf16 runs at smaller sizes: without AVX-512 BF16/AMX, CPU bf16
    matmuls are several times slower than fp32 (docs/performance.md), and the ratios are per-layer properties."""
    if quick:
        return {
            "moe_layer": dict(cases=[("vit-b16", "fp32", 1, 5), ("vit-b16", "bf16", 1, 3)]),
            "tower": dict(cases=[("vit-b16", 2, 1, "fp32", 5), ("vit-b16", 1, 1, "bf16", 3)]),
            "train": dict(size="tiny", layers=None, batch=16, repeats=5, peak_n=1024),
            "generate": dict(cases=[dict(name="tiny", vision_size="tiny", vision_layers=2,
                                         lm=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2),
                                         new_tokens=16, repeats=5)]),
            "data": dict(num_images=128, batch=32, workers=2, repeats=3),
        }
    return {
        "moe_layer": dict(cases=[("vit-b16", "fp32", 8, 7), ("vit-l14-336", "fp32", 8, 5),
                                 ("vit-b16", "bf16", 1, 3), ("vit-l14-336", "bf16", 1, 3)]),
        "tower": dict(cases=[("vit-b16", None, 2, "fp32", 5), ("vit-b16", 2, 8, "fp32", 5),
                             ("vit-l14-336", 4, 1, "fp32", 5), ("vit-b16", 2, 1, "bf16", 3)]),
        "train": dict(size="vit-b16", layers=4, batch=4, repeats=3, peak_n=2048),
        # "llava-share": the tower's share of the FLOPs (~6%) close to LLaVA-1.5-7B with ViT-L/14-336 (~4%);
        # "tower-heavy": a full ViT-B/16 tower in front of a 100M LM (share ~40%), compared with its FLOP ideal.
        "generate": dict(cases=[dict(name="llava-share", vision_size="vit-b16", vision_layers=1, lm=_LM_100M,
                                     new_tokens=32, repeats=5),
                                dict(name="tower-heavy", vision_size="vit-b16", vision_layers=12, lm=_LM_100M,
                                     new_tokens=32, repeats=3)]),
        "data": dict(num_images=512, batch=32, workers=2, repeats=5),
    }


def run_benchmarks(items=ITEMS, quick: bool = False, dtypes=("fp32", "bf16"), json_out: str | None = None,
                   repeats: int | None = None, overrides: dict | None = None, profile: bool = False,
                   log=print) -> dict:
    """Runs ``items`` at the `plan` sizes (``overrides``: item -> dict of plan keys to replace; ``repeats``
    replaces every item's rounds) and returns (and writes to ``json_out``) every measurement."""
    p = plan(quick)
    for key, value in (overrides or {}).items():
        p[key].update(value)
    if repeats:
        for key, q in p.items():
            if "cases" in q and q["cases"] and isinstance(q["cases"][0], dict):
                for c in q["cases"]:
                    c["repeats"] = repeats
            elif "cases" in q:
                q["cases"] = [tuple(c[:-1]) + (repeats,) for c in q["cases"]]
            else:
                q["repeats"] = repeats
    result = {"quick": quick, "machine_before": machine_info(), "targets": TARGETS, "plan": p, "items": {}}
    info = result["machine_before"]
    log(f"# {info['cpu']}, {info['logical_cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"ISA {','.join(info['isa'])}, native bf16: {info['bf16_native']}, load average {info['load_average']}")
    t_all = time.perf_counter()
    result["load_average_at_start_of"] = {}
    for item in items:
        result["load_average_at_start_of"][item] = machine_info()["load_average"]
        t0 = time.perf_counter()
        if item == "moe_layer":
            q = p[item]
            result["items"][item] = bench_moe_layer([tuple(c) for c in q["cases"]], list(dtypes), log)
        elif item == "tower":
            q = p[item]
            result["items"][item] = bench_tower([tuple(c) for c in q["cases"]], list(dtypes), log)
        elif item == "train":
            result["items"][item] = bench_train(log=log, **p[item])
        elif item == "generate":
            result["items"][item] = [bench_generate(log=log, **c) for c in p[item]["cases"]]
        elif item == "data":
            result["items"][item] = bench_data(log=log, **p[item])
        else:
            raise ValueError(f"unknown item {item!r}; valid: {', '.join(ITEMS)}")
        log(f"  ({item}: {time.perf_counter() - t0:.1f} s)")
    if profile:
        result["profile_moe_layer"] = {f"{c[0]}/{c[1]}/B{c[2]}": profile_moe(c[0], c[2], c[1])
                                       for c in p["moe_layer"]["cases"] if c[1] in dtypes}
        for key, ops in result["profile_moe_layer"].items():
            log(f"profile {key}: " + ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops[:6]))
        result["profile_tower"] = {}
        for case in p["tower"]["cases"]:
            size, layers, batch, dtype = case[:4]
            if dtype not in dtypes:
                continue
            prof = profile_tower(size, layers, batch, dtype)
            result["profile_tower"][f"{size}/L{layers or 'all'}/B{batch}/{dtype}"] = prof
            log(f"profile tower {size} {dtype}: ms per forward, dense "
                + ", ".join(f"{k} {v:.1f}" for k, v in prof["dense"]["part_ms"].items()) + "; moe "
                + ", ".join(f"{k} {v:.1f}" for k, v in prof["moe"]["part_ms"].items())
                + f"; ffn moe/dense {prof['ffn_time_ratio_moe_over_dense']:.2f} (ideal ~2.0)")
    result["seconds"] = time.perf_counter() - t_all
    log(markdown_table(result))
    result["machine_after"] = machine_info()
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1, default=float))
        log(f"wrote {json_out}")
    return result
