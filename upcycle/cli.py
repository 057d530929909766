"""``python scripts/upcycle_encoder.py``: turn a dense CLIP into a CLIP-MoE (recipes dmu, clip-up, dense).

Settings come from the defaults, then ``--config FILE.yaml`` (same keys as the flags, with underscores), then
the flags given. Runs on one process or under ``accelerate launch`` (DDP, CPU or GPU).

An ``--output`` that already holds a run is continued (``--resume``), reused when its saved settings are the
same, or started over (``--overwrite``); a run with other settings is refused before the folder is touched
(`upcycle.recipes.check_output_folder`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from clipmoe_vlm.run_config import add_flags, from_flags

from .config import UpcycleConfig, load_config

PRESET_SHAPES = Path(__file__).with_name("presets") / "shapes.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Turn a dense CLIP into a sparse Mixture-of-Experts CLIP (CLIP-MoE). The output folder loads "
                    "with transformers' AutoModel after `import clipmoe_vlm` and holds a model card, metrics.jsonl "
                    "and the resolved run config. With no --data and no --config, the embedded Shapes default "
                    "runs (its settings: upcycle/presets/shapes.yaml).")
    parser.add_argument("--config", help="YAML file with settings (nested by section, or flat with the flags' "
                                         "names in underscores); flags override it")
    add_flags(parser, UpcycleConfig)
    return parser


def parse_config(argv: list[str] | None) -> UpcycleConfig:
    args = build_parser().parse_args(argv)
    flags = from_flags(args, UpcycleConfig)
    config_file = args.config
    if config_file is None and not flags.get("data"):
        config_file = PRESET_SHAPES  # the embedded default: Shapes world settings (flags still override)
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
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if cfg.run.bf16 else "no")
    from .engine import whole_models_under_zero3

    whole_models_under_zero3(accelerator)
    argv = argv if argv is not None else sys.argv[1:]
    try:
        with deterministic_algorithms(cfg.run.deterministic):
            cfg = resolve_defaults(cfg, accelerator)
            if cfg.shapes.compare:
                return run_comparison(cfg, accelerator, argv)
            return run_upcycling(cfg, accelerator, argv)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch's deterministic algorithms for the duration of a run, then the previous setting again (``main`` is
    also called in-process, by `reproduce` and tests: a global switch must not outlive the run)."""
    import torch

    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic GEMMs need it
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
