"""``clipmoe train-llava``: the library's LLaVA training (`clipmoe_vlm.llava.train`) plus the two steps that need
the recipes or another stage, so that the CPU default runs from nothing:

- the default vision tower (``runs/clip-moe``) is built with the upcycling default run when it is missing;
- stage 2 on the embedded Shapes data starts with stage 1 when its ``--model`` folder is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clipmoe_vlm import defaults
from clipmoe_vlm.llava.train import LlavaTrainConfig, load_config, run

__all__ = ["ensure_default_tower", "train"]


def _missing(folder: str | Path | None) -> bool:
    return folder is not None and not (Path(folder) / "config.json").is_file()


def ensure_default_tower(tower: str | Path | None) -> None:
    """Builds the default CLIP-MoE (``clipmoe upcycle`` with no flags) if ``tower`` is it and it is missing."""
    if tower is None or not _missing(tower) or Path(tower).resolve() != defaults.DEFAULT_CLIPMOE.resolve():
        return
    from upcycle.cli import main as upcycle

    print(f"[train-llava] {tower} missing: building the default CLIP-MoE (`clipmoe upcycle`)", flush=True)
    upcycle([])


def _stage_one_first(config: LlavaTrainConfig) -> None:
    """Stage 2 of the embedded default starts from stage 1's folder: train it first if it is missing."""
    resolved = config.resolve()
    if resolved.stage != "finetune" or config.data.data_path is not None or not _missing(resolved.modeling.model):
        return
    print(f"[train-llava] {resolved.modeling.model} missing: running stage 1 (pretrain-cpu preset) first", flush=True)
    argv = ["--preset", "pretrain-cpu", "--output-dir", str(resolved.modeling.model), "--world-seed", str(config.data.world_seed),
            "--seed", str(config.optim.seed)]
    if config.modeling.vision_tower is not None:
        argv += ["--vision-tower", config.modeling.vision_tower]
    train(argv)


def train(argv: Sequence[str] | None = None) -> Path:
    config = load_config(None if argv is None else list(argv))
    _stage_one_first(config)
    resolved = config.resolve()
    if resolved.modeling.model is None or not _missing(resolved.modeling.model):
        ensure_default_tower(resolved.modeling.vision_tower)
    return run(config).output_dir
