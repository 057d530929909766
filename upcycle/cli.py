"""``python scripts/upcycle_encoder.py``: turn a dense CLIP into a CLIP-MoE (recipes dmu, clip-up, dense).

Settings come from the defaults, then ``--config FILE.yaml`` (same keys as the flags, with underscores), then
the flags given. Runs on one process or under ``accelerate launch`` (DDP, CPU or GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .config import RECIPES, UpcycleConfig, load_config
from .sources import BASE_SPECS
from .trainable import TRAINABLE_SETS

_DEFAULTS = UpcycleConfig()


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = argparse.ArgumentParser(
        prog="upcycle_encoder.py",
        description="Turn a dense CLIP into a sparse Mixture-of-Experts CLIP (CLIP-MoE). The output folder loads "
                    "with transformers' AutoModel after `import clipmoe_vlm` and holds a model card, metrics.jsonl "
                    "and the resolved run config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=None)
    g = p.add_argument_group("what to run")
    g.add_argument("--config", help="YAML file with settings (keys as the flags, underscores); flags override it")
    g.add_argument("--base", help="dense CLIP to start from: shapes-tiny (a tiny CLIP trained from scratch on the "
                   "Shapes world, cached); " + "; ".join(BASE_SPECS) + f" [{d.base}]")
    g.add_argument("--data", nargs="+", help="image-text sources: JSONL/CSV (image, caption), LLaVA/ShareGPT4V JSON "
                   "(FILE.json::IMAGE_ROOT), img2dataset folders, WebDataset .tar shards, datasets folders "
                   "[the built-in Shapes world, generated once into .cache/clipmoe-vlm]")
    g.add_argument("--recipe", choices=RECIPES, help=f"dmu = CLIP-MoE (MCL experts + router tuning), clip-up = "
                   f"sparse upcycling, dense = dense fine-tuning baseline [{d.recipe}]")
    g.add_argument("--output", help=f"output folder [{d.output}]")
    g = p.add_argument_group("MoE shape")
    g.add_argument("--num-experts", type=int, help=f"experts per MoE layer [{d.num_experts}]")
    g.add_argument("--top-k", type=int, help=f"experts per token [{d.top_k}]")
    g.add_argument("--moe-layers", help=f"MoE layers in both towers: all, every-2, last-N or 0,2,4 [{d.moe_layers}]")
    g.add_argument("--expert-dropout", type=float, help=f"dropout inside experts [{d.expert_dropout}]")
    g.add_argument("--router-jitter-noise", type=float, help=f"std of router logit noise in training [0]")
    g.add_argument("--capacity-factor", type=float, help="expert capacity factor with token dropping [none]")
    g.add_argument("--batch-priority-routing", action="store_true", help="fill expert capacity by top-1 gate value")
    g = p.add_argument_group("MCL (recipe dmu)")
    g.add_argument("--stages", type=int, help="MCL stages; must be num-experts - 1 [num-experts - 1]")
    g.add_argument("--clusters", type=int, help=f"k-means clusters per modality per stage [{d.clusters}]")
    g.add_argument("--mcl-leftover", choices=("drop", "mixed"), help="samples that do not fill a global batch of "
                   "their cluster: drop (official, counted and reported) or pool into mixed batches [drop]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"epochs per stage [{d.epochs}]")
    g.add_argument("--batch-size", type=int, help=f"batch size per process; the global batch is this times the "
                   f"number of processes [{d.batch_size}]")
    g.add_argument("--mcl-lr", type=float, help=f"learning rate of MCL stages [{d.mcl_lr}]")
    g.add_argument("--router-lr", type=float, help=f"learning rate of router tuning [{d.router_lr}]")
    g.add_argument("--clipup-lr", type=float, help=f"learning rate of clip-up [{d.clipup_lr}]")
    g.add_argument("--dense-lr", type=float, help=f"learning rate of the dense baseline [{d.dense_lr}]")
    g.add_argument("--clipup-trainable", choices=TRAINABLE_SETS, help="clip-up parameters [experts+router]")
    g.add_argument("--dense-trainable", choices=TRAINABLE_SETS, help="dense-baseline parameters [ffn]")
    g.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps before cosine decay [{d.warmup_steps}]")
    g.add_argument("--label-smoothing", type=float, help=f"contrastive label smoothing [{d.label_smoothing}]")
    g.add_argument("--temperature", type=float, help=f"fixed softmax temperature; the Shapes preset uses the "
                   f"base's own learned one [{d.temperature}]")
    g.add_argument("--learn-temperature", action="store_true", help="train the model's logit scale instead")
    g = p.add_argument_group("auxiliary losses")
    g.add_argument("--lb-coef-image", type=float, help=f"image load-balancing weight [{d.lb_coef_image}]")
    g.add_argument("--lb-coef-text", type=float, help=f"text load-balancing weight [{d.lb_coef_text}]")
    g.add_argument("--z-loss-coef", type=float, help="router z-loss weight (CLIP-UP) [0]")
    g.add_argument("--local-entropy-coef", type=float, help="LIMoE local entropy weight [0]")
    g.add_argument("--global-entropy-coef", type=float, help="LIMoE global entropy weight [0]")
    g.add_argument("--global-entropy-min-experts", type=float, help="LIMoE soft minimum S (threshold log S) [none]")
    g = p.add_argument_group("data and run")
    g.add_argument("--context-length", type=int, help="text tokens [the base's max positions]")
    g.add_argument("--val-fraction", type=float, help=f"pairs held out for the final retrieval check "
                   f"[{d.val_fraction}]")
    g.add_argument("--max-samples", type=int, help="use only the first N pairs [all]")
    g.add_argument("--num-workers", type=int, help=f"data loader workers per process [{d.num_workers}]")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU with AVX-512 BF16, or GPU)")
    g.add_argument("--seed", type=int, help=f"seed for data order, clustering, router init [{d.seed}]")
    g.add_argument("--resume", action="store_true", help="continue a run in --output from its last checkpoint")
    g.add_argument("--save-every", type=int, help=f"checkpoint every N steps within a stage [{d.save_every}]")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard through accelerate")
    g.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the dense and clip-up baselines and print one comparison table "
                        "[on when --data is not given]")
    g.add_argument("--base-epochs", type=int, help=f"epochs of the tiny Shapes base trained from scratch "
                   f"[{d.base_epochs}]")
    g.add_argument("--shapes-scale", type=float, help="size of the generated Shapes world relative to the default "
                   "(4,000 training pairs) [1.0]")
    g.add_argument("--stop-after-steps", type=int, help="stop as if killed after N optimizer steps in total "
                   "(to test --resume)")
    return p


PRESET_SHAPES = Path(__file__).with_name("presets") / "shapes.yaml"


def parse_config(argv: list[str] | None) -> UpcycleConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    if config_file is None and not args.get("data"):
        config_file = PRESET_SHAPES  # the embedded default: Shapes world settings (flags still override)
    flags = {k: v for k, v in args.items() if v is not None and (v is not False or k == "compare")}
    known = {f.name for f in dataclasses.fields(UpcycleConfig)}
    assert set(flags) <= known, set(flags) - known
    return load_config(config_file, flags)


def main(argv: list[str] | None = None) -> Path:
    try:
        cfg = parse_config(argv)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    from accelerate import Accelerator

    from .default_run import resolve_defaults, run_comparison
    from .recipes import run_upcycling

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    # cpu=True on a machine without CUDA makes accelerate join a torchrun-style launch as MULTI_CPU (gloo).
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if cfg.bf16 else "no",
                              log_with="tensorboard" if cfg.tensorboard else None, project_dir=cfg.output)
    argv = argv if argv is not None else sys.argv[1:]
    try:
        cfg = resolve_defaults(cfg, accelerator)
        if cfg.compare:
            return run_comparison(cfg, accelerator, argv)
        return run_upcycling(cfg, accelerator, argv)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
