"""The ``moe_layer`` and ``tower`` items: the sparse block and the CLIP-MoE vision tower against their dense
counterparts, the contenders they race (the naive per-expert loop, the padded-bmm candidate), and the profiles
that ``--profile`` records."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPMLP

from clipmoe_vlm import CLIPMoEVisionConfig, CLIPMoEVisionModel
from clipmoe_vlm.moe import CLIPMoESparseBlock, capacity_mask, default_experts_implementation

from .models import VIT_SIZES, cpu_autocast, vision_configs
from .timing import interleaved, moe_layer_flops, vision_tower_flops

__all__ = [
    "IMPLEMENTATIONS",
    "NaiveLoopMoE",
    "PaddedBmmMoE",
    "bench_moe_layer",
    "bench_tower",
    "padded_bmm_grouped_forward",
    "profile_moe",
    "profile_tower",
    "with_padded_bmm",
]


# ------------------------------------------------------------------------------------------------ contenders


class NaiveLoopMoE(nn.Module):
    """The ``naive_loop`` contender: transformers' former Mixtral dispatch over the same router and expert
    tensors as a `CLIPMoESparseBlock`: for each expert, ``torch.where`` on the one-hot routing mask, index the
    tokens, compute, ``index_add_``. With a capacity factor, the assignments `capacity_mask` drops are masked
    out. Returns the block's hidden states (B, S, H) only."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        block = self.block
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        logits, weights, indices = block.gate(x)
        mask = F.one_hot(indices, block.num_experts)  # (T, k, E)
        if block.capacity_factor is not None:
            priority = (logits.float().softmax(-1).amax(-1) if block.batch_priority_routing else None)
            kept = capacity_mask(indices, block.num_experts, block.capacity_factor, priority)
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
    """Candidate experts kernel: the expert-sorted tokens are copied into zero-padded (E, max(counts), H) buffers
    and each projection is one ``torch.baddbmm`` over all experts (2 matmul calls instead of 2E, and E independent
    GEMMs that the BLAS can spread over threads), at the price of computing the padding rows. Same values as the
    eager loop (padding rows are dropped); unweighted outputs in the sorted order."""
    num_experts, cmax = len(counts), max(counts)
    if cmax == 0:
        return x_sorted.new_zeros(x_sorted.shape)
    valid = torch.arange(cmax, device=x_sorted.device)[None, :] < torch.tensor(counts, device=x_sorted.device)[:, None]
    buf = x_sorted.new_zeros(num_experts, cmax, x_sorted.shape[1])
    buf[valid] = x_sorted  # row-major over (expert, slot) = the expert-sorted order
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else buf.dtype
    with torch.autocast("cpu", enabled=False):
        buf = buf.to(dtype)
        h = torch.baddbmm(experts.up_proj_bias[:, None, :].to(dtype), buf, experts.up_proj.to(dtype).transpose(1, 2))
        h = experts.act_fn(h)
        out = torch.baddbmm(experts.down_proj_bias[:, None, :].to(dtype), h,
                            experts.down_proj.to(dtype).transpose(1, 2))
    return out[valid]


class PaddedBmmMoE(nn.Module):
    """The ``padded_bmm`` candidate: ``block``'s routing (capacity included) with `padded_bmm_grouped_forward` as
    its experts kernel. Returns the block's hidden states (B, S, H) only."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        _, weights, indices = self.block.route(x)
        order = torch.argsort(indices.reshape(-1), stable=True)
        token_index = order // indices.shape[1]
        counts = torch.bincount(indices.reshape(-1), minlength=self.block.num_experts).tolist()
        y = padded_bmm_grouped_forward(self.block.experts, x[token_index], counts)
        y = y * weights.reshape(-1)[order, None]
        out = y.new_zeros(x.shape[0], hidden).index_add_(0, token_index, y)
        return out.to(hidden_states.dtype).view(batch, seq, hidden)


def with_padded_bmm(block):
    """``block`` (sharing its parameters) with the padded-bmm experts kernel (`PaddedBmmMoE`)."""
    return PaddedBmmMoE(block)


# ------------------------------------------------------------------------------------------------ items

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
DEFAULT = default_experts_implementation()  # the "moe" contender: the kernel a CLIP-MoE model gets on this machine
# batched_mm gathers one (I, H) weight matrix per token and expert, for both projections: raced only where that
# gather stays under this many bytes (ViT-B/16 at batch 8 would need ~30 GB)
_BATCHED_MM_MAX_BYTES = 2 * 2**30


def _implementations(tokens: int, top_k: int, hidden: int, inter: int, bytes_per: int = 4) -> list[str]:
    gathered = 2 * tokens * top_k * hidden * inter * bytes_per
    return [i for i in IMPLEMENTATIONS if i != "batched_mm" or gathered <= _BATCHED_MM_MAX_BYTES]


def _with_implementation(config, implementation: str, fn):
    """``fn`` run with ``config``'s experts kernel set to ``implementation`` (the experts read it per forward)."""
    def f():
        config._experts_implementation = implementation
        return fn()
    return f


def bench_moe_layer(cases: list[tuple[str, str, int, int]], dtypes: list[str], log=print) -> list[dict]:
    """``cases``: (size name, dtype, batch, repeats); cases whose dtype is not in ``dtypes`` are skipped."""
    rows = []
    for size, dtype, batch, repeats in cases:
        if dtype not in dtypes:
            continue
        spec = VIT_SIZES[size]
        cfg = CLIPMoEVisionConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                                  num_hidden_layers=1, num_attention_heads=spec["heads"], num_experts=4, top_k=2,
                                  experts_implementation=DEFAULT)
        torch.manual_seed(0)
        moe = CLIPMoESparseBlock(cfg).eval()
        dense = CLIPMLP(cfg).eval()
        naive = NaiveLoopMoE(moe).eval()
        candidate = with_padded_bmm(moe)
        x = torch.randn(batch, spec["seq"], spec["hidden"])
        x2 = torch.cat([x, x], dim=0)  # twice the tokens: the FLOPs of top-2
        t = batch * spec["seq"]
        flops_moe = moe_layer_flops(t, spec["hidden"], spec["intermediate"], 4, 2)
        flops_dense = moe_layer_flops(2 * t, spec["hidden"], spec["intermediate"], 4, 2, dense=True)
        def run(m, inp, dt=dtype):
            def f():
                with torch.no_grad(), cpu_autocast(dt):
                    return m(inp)
            return f
        contenders = {"dense_2x_tokens": run(dense, x2),
                      "moe": _with_implementation(cfg, DEFAULT, run(moe, x)), "naive_loop": run(naive, x),
                      "moe_padded_bmm_candidate": run(candidate, x)}
        impls = _implementations(t, 2, spec["hidden"], spec["intermediate"]) if dtype == "fp32" else []
        for impl in impls:
            if impl != DEFAULT:  # the default kernel is the "moe" contender
                contenders[f"moe_{impl}"] = _with_implementation(cfg, impl, run(moe, x))
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
               "moe_over_dense_by_implementation": {i: ratio["moe" if i == DEFAULT else f"moe_{i}"]
                                                    for i in impls},
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
               f"{row['bf16_over_fp32_time']['moe']:.2f}" if dtype == "bf16" else "")
            + "".join(f"  {i} {r:.3f}" for i, r in row["moe_over_dense_by_implementation"].items()))
    return rows


def bench_tower(cases: list[tuple[str, int | None, int, str, int]], dtypes: list[str], log=print) -> list[dict]:
    """``cases``: (size name, layers or None for the full depth, batch, dtype, repeats)."""
    rows = []
    for size, layers, batch, dtype, repeats in cases:
        if dtype not in dtypes:
            continue
        dcfg, mcfg = vision_configs(size, layers)
        torch.manual_seed(0)
        dense = CLIPVisionModel(dcfg).eval()
        moe = CLIPMoEVisionModel(mcfg).eval()
        pix = torch.randn(batch, 3, dcfg.image_size, dcfg.image_size)
        fd, fm = vision_tower_flops(dcfg, batch, moe=False), vision_tower_flops(mcfg, batch, moe=True)
        ideal = fm["total"] / fd["total"]
        def run(m, dt=dtype, images=pix):
            def f():
                with torch.no_grad(), cpu_autocast(dt):
                    return m(pixel_values=images)
            return f
        contenders = {"dense": run(dense), "moe": _with_implementation(moe.config, DEFAULT, run(moe))}
        tokens = batch * (dcfg.image_size // dcfg.patch_size) ** 2 + batch
        impls = _implementations(tokens, mcfg.top_k, mcfg.hidden_size, mcfg.intermediate_size) \
            if dtype == "fp32" else []
        for impl in impls:
            if impl != DEFAULT:
                contenders[f"moe_{impl}"] = _with_implementation(moe.config, impl, run(moe))
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
               # achieved FLOP/s over the dense tower's = FLOP-ideal time ratio / measured time ratio
               "efficiency_by_implementation": {
                   i: ideal / res["ratio_to_dense"]["moe" if i == DEFAULT else f"moe_{i}"] for i in impls},
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
               f"{row['bf16_over_fp32_time']['moe']:.2f}" if dtype == "bf16" else "")
            + "".join(f"  {i} {e:.3f}" for i, e in row["efficiency_by_implementation"].items()))
    return rows


# ------------------------------------------------------------------------------------------------ profiles


def profile_moe(size: str, batch: int, dtype: str, top: int = 12) -> list[dict]:
    """The ops that cost the time in one `CLIPMoESparseBlock` forward (torch.profiler, CPU self time)."""
    spec = VIT_SIZES[size]
    cfg = CLIPMoEVisionConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                              num_hidden_layers=1, num_attention_heads=spec["heads"], num_experts=4, top_k=2,
                              experts_implementation=DEFAULT)
    block = CLIPMoESparseBlock(cfg).eval()
    x = torch.randn(batch, spec["seq"], spec["hidden"])
    with torch.no_grad(), cpu_autocast(dtype):
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
    dcfg, mcfg = vision_configs(size, layers)
    torch.manual_seed(0)
    pix = torch.randn(batch, 3, dcfg.image_size, dcfg.image_size)
    models = {"dense": CLIPVisionModel(dcfg).eval(), "moe": CLIPMoEVisionModel(mcfg).eval()}
    handles = [h for name, model in models.items() for h in _label_modules(model, name)]
    with torch.no_grad(), cpu_autocast(dtype):
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
