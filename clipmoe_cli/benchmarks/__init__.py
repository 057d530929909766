"""Side-by-side benchmarks of CLIP-MoE against its dense counterparts (every figure a ratio measured in one run).

    python scripts/benchmark.py --quick --json runs/bench-quick.json      # about a minute
    python scripts/benchmark.py --json runs/bench.json                    # the full sizes (docs/performance.md)
    python scripts/benchmark.py --items moe_layer tower --dtypes fp32     # a subset
    python scripts/benchmark.py --help                                    # every flag

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
- ``data``: `clipmoe_vlm.data.image_text.ImageTextDataset` + `collate_image_text` through a 2-worker
  DataLoader, samples/s, vs the samples/s an MCL training step of the tiny Shapes CLIP-MoE consumes at batch 32.
  Target >= 1.
- ``upcycle``: `sparse_upcycle`, the DMU expert assembly and `load_official_clipmoe` of a ViT-L/14-336 CLIP
  (E=4 in every layer of both towers, random weights), each in its own process: seconds and peak RSS over the
  resident memory before plus the MoE's bytes. Targets: <= 10 s CPU time, <= 1.10.
- ``loop``: the upcycling engine's whole training loop (one epoch of `Engine.train_stage`: sampler, loader,
  collate, logging, progress bar, final save) vs the raw training step on a batch in memory, samples/s, same
  tiny CLIP and batch; with the pairs decoded once (`clipmoe_vlm.data.decoded_pairs`) and streaming. Target
  >= 0.9 decoded.

Modules: `timing` (interleaved timing, machine description, FLOP counts), `models` (sizes and model builders),
`moe` (``moe_layer``, ``tower``, their contenders and profiles), `training` (``train``, ``generate``), `data`
(``data``), `loop` (``loop``), `report` (the Markdown table); this one holds the plan, the driver and the command line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# `import clipmoe_vlm` sets the OMP_WAIT_POLICY default, which acts only if it runs before torch's first import.
import clipmoe_vlm  # noqa: F401  # isort: skip
import torch

from .data import bench_data
from .loop import bench_loop
from .moe import bench_moe_layer, bench_tower, profile_moe, profile_tower
from .report import markdown_table
from .timing import machine_info
from .training import bench_generate, bench_train
from .upcycle import bench_upcycle

__all__ = ["ITEMS", "TARGETS", "build_parser", "main", "plan", "run_benchmarks"]

ITEMS = ("moe_layer", "tower", "train", "generate", "data", "loop", "upcycle")

TARGETS = {
    "moe_layer": "moe_time / dense_equal_flops_time <= 1.05",
    "tower": "efficiency = ideal_time_ratio / measured_time_ratio >= 0.95",
    "train": "achieved_flops_per_s / peak_matmul_flops_per_s >= 0.50 (fp32)",
    "generate": "moe_tokens_per_s / dense_tokens_per_s >= 0.95",
    "data": "loader_samples_per_s / train_step_samples_per_s >= 1.0",
    "loop": "engine_loop_samples_per_s / raw_train_step_samples_per_s >= 0.90 (pairs decoded once)",
    "upcycle": "cpu_seconds <= 10 and peak_rss / (rss_before + moe_bytes) <= 1.10",
}

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
            "loop": dict(num_images=256, batch=64, workers=2, repeats=2),
            "upcycle": dict(size="vit-b16", num_experts=4),
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
        # the embedded default's tiny CLIP at the base's batch size, over one epoch of 1,024 pairs
        "loop": dict(num_images=1024, batch=64, workers=2, repeats=3),
        "upcycle": dict(size="vit-l14-336", num_experts=4),
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
        elif item == "loop":
            result["items"][item] = bench_loop(log=log, **p[item])
        elif item == "upcycle":
            result["items"][item] = bench_upcycle(log=log, **p[item])
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


# ------------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", nargs="+", choices=ITEMS, default=list(ITEMS),
                        help="which benchmarks to run (default: all, in this order)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (about a minute); the default runs the ViT-B/16 and "
                             "ViT-L/14-336 sizes")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="precisions of the moe_layer and tower items (bf16 = torch.autocast on the CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per item (default: the plan's, 3 to 7); the median round is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before running (default: torch's choice)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one sparse-block forward per size/dtype (torch.profiler) and record "
                             "the ops that cost the time")
    parser.add_argument("--json", metavar="OUT", default=None, help="write every measurement to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for inputs and random weights")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """``python scripts/benchmark.py [flags]``: parses ``argv`` (default: the command line), seeds torch, sets
    its thread count if asked, and runs `run_benchmarks`; returns its result."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_benchmarks(items=args.items, quick=args.quick, dtypes=args.dtypes, json_out=args.json,
                          repeats=args.repeats, profile=args.profile)
