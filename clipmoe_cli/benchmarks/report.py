"""The Markdown table of a `run_benchmarks` result (the table of docs/performance.md)."""

from __future__ import annotations

__all__ = ["markdown_table"]


def markdown_table(result: dict) -> str:
    """One Markdown table of every measured ratio of a `run_benchmarks` result (the table of
    docs/performance.md)."""
    lines = ["| item | case | measured | ratio | target | |", "| --- | --- | --- | --- | --- | --- |"]

    def add(item, case, measured, ratio, target, ok):
        mark = "" if ok is None else "ok" if ok else "**miss**"  # None: a reference row without a target
        lines.append(f"| {item} | {case} | {measured} | {ratio} | {target} | {mark} |")

    items = result["items"]
    for r in items.get("moe_layer", []):
        m = r["median_s"]
        extra = (f"; bf16/fp32 time: dense {r['bf16_over_fp32_time']['dense_2x_tokens']:.2f}x, MoE "
                 f"{r['bf16_over_fp32_time']['moe']:.2f}x" if "bf16_over_fp32_time" in r else "")
        add("MoE layer", f"{r['size']} {r['dtype']}, {r['tokens']} tokens",
            f"dense(2T) {m['dense_2x_tokens']*1e3:.0f} ms, MoE {m['moe']*1e3:.0f} ms, naive loop "
            f"{m['naive_loop']*1e3:.0f} ms; naive/dense {r['naive_over_dense']:.3f}, padded-bmm/dense "
            f"{r['padded_bmm_candidate_over_dense']:.3f}{extra}"
            + "".join(f"; {i} {v:.3f}" for i, v in r.get("moe_over_dense_by_implementation", {}).items()),
            f"MoE/dense {r['moe_over_dense']:.3f}", "<= 1.05", r["pass"])
    for r in items.get("tower", []):
        extra = (f"; bf16/fp32 time: dense {r['bf16_over_fp32_time']['dense']:.2f}x, MoE "
                 f"{r['bf16_over_fp32_time']['moe']:.2f}x" if "bf16_over_fp32_time" in r else "")
        add("vision tower", f"{r['size']} {r['dtype']}, {r['layers']} layers, batch {r['batch']}",
            f"dense {r['images_per_s']['dense']:.2f} img/s, MoE {r['images_per_s']['moe']:.2f} img/s; time ratio "
            f"{r['measured_time_ratio']:.3f} vs FLOP-ideal {r['ideal_time_ratio']:.3f}{extra}"
            + "".join(f"; {i} efficiency {v:.3f}" for i, v in r.get("efficiency_by_implementation", {}).items()),
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
    for r in items.get("loop", []):
        add("training loop", f"engine epoch, {r['contender'].removeprefix('loop_')} pairs, {r['images']} images, "
            f"batch {r['batch']}, {r['workers']} workers", f"loop {r['samples_per_s']:.0f} samples/s, raw step "
            f"{r['raw_step_samples_per_s']:.0f} samples/s", f"{r['ratio_to_raw_step']:.3f}", r["target"], r["pass"])
    for r in items.get("upcycle", []):
        add("upcycling", f"{r['case']}, {r['size']} CLIP, E={r['num_experts']} ({r['moe_parameters']/1e6:.0f}M params)",
            f"{r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU); peak RSS {r['peak_rss_bytes']/1e9:.2f} GB, before "
            f"{r['rss_before_bytes']/1e9:.2f} GB + MoE {r['moe_bytes']/1e9:.2f} GB",
            f"{r['cpu_seconds']:.1f} s CPU, peak {r['peak_over_before_plus_moe']:.3f}", "<= 10 s CPU, <= 1.10",
            r["pass"])
    return "\n".join(lines)
