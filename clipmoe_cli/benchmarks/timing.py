"""How the benchmarks measure: interleaved timing of contenders, the machine description, and FLOP counts
(analytic formulas and ``FlopCounterMode``)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = [
    "count_flops",
    "interleaved",
    "machine_info",
    "moe_layer_flops",
    "peak_matmul",
    "vision_tower_flops",
]


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


def peak_matmul(n: int) -> Callable[[], object]:
    """An ``n`` x ``n`` fp32 matmul (``2 n^3`` FLOPs): the peak-FLOP/s reference timed beside a training step."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: torch.mm(a, b)


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
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``torch._grouped_mm``: 2 x (rows of A) x (inner size) x (columns of B), the groups splitting one of them
    ((S, K) x (E, K, N), the CLIP-MoE experts' forward; (K, S) x (S, N) -> (E, K, N), their weights' gradient;
    (E, M, K) x (E, K, N), batched)."""
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1]


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul FLOPs of ``fn()`` by ``FlopCounterMode``. PyTorch registers no formula for the CPU flash-attention
    kernel that SDPA dispatches to on the CPU (its S x S products would count 0), so its forward and backward
    get the formulas PyTorch uses for the CUDA attention kernels; nor for the grouped GEMM of transformers'
    ``grouped_mm`` experts implementation (the CLIP-MoE default with CUDA), which gets `_grouped_mm_flops`."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    if hasattr(aten, "_grouped_mm"):
        mapping[aten._grouped_mm] = _grouped_mm_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())
