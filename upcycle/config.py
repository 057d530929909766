"""The upcycling run's typed configuration (`clipmoe_vlm.run_config`: defaults <- YAML file <- flags).

Defaults follow CLIP-MoE's official code: MCL stages at lr 1e-5 / wd 0.2, routers at lr 1e-6 / wd 0.01, 200
warm-up steps then cosine, label smoothing 0.1, fixed temperature 0.01, top-2 of 4 experts in every layer of
both towers, expert dropout 0.1, load balancing 0.01 (image) and 0.005 (text).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clipmoe_vlm.loading import BASE_SPECS
from clipmoe_vlm.run_config import ConfigError, as_dict, load, setting

from .trainable import TRAINABLE_SETS

__all__ = ["RECIPES", "TRAINABLE_SETS", "UpcycleConfig", "load_config"]

RECIPES = ("dmu", "clip-up", "dense")
Recipe = Literal[RECIPES]
TrainableSet = Literal[TRAINABLE_SETS]


@dataclass
class MoEShape:
    num_experts: int = setting(4, "experts per MoE layer")
    top_k: int = setting(2, "experts per token")
    moe_layers: str = setting("all", "MoE layers in both towers: all, every-2, last-N or 0,2,4")
    expert_dropout: float = setting(0.1, "dropout inside experts")
    router_jitter_noise: float = setting(0.0, "std of router logit noise in training")
    capacity_factor: float | None = setting(None, "expert capacity factor with token dropping")
    batch_priority_routing: bool = setting(False, "fill expert capacity by top-1 gate value")
    norm_topk_prob: bool = setting(True, "renormalise the top-k gates (CLIP-MoE, Mixtral); off: raw gates")
    # eager by default: on CPU it measured faster than grouped_mm (docs/performance.md), and it is deterministic,
    # so a resumed run equals an uninterrupted one; grouped_mm is only with --deterministic (its per-row bias gather
    # accumulates its gradient in a varying order on the CPU)
    experts_implementation: Literal["grouped_mm", "eager", "batched_mm"] = setting(
        "eager", "experts kernel of the upcycled model (transformers' experts interface): eager (a matmul per "
                 "expert; deterministic), grouped_mm (GPUs) or batched_mm; every kernel computes the same function")


@dataclass
class MCLSettings:
    stages: int | None = setting(None, "MCL stages; must be num-experts - 1 (the default)")
    clusters: int = setting(3, "k-means clusters per modality per stage")
    mcl_leftover: Literal["drop", "mixed"] = setting(
        "drop", "samples that do not fill a global batch of their cluster: drop (official, counted and "
                "reported) or pool into mixed batches")


@dataclass
class Optimisation:
    epochs: int = setting(1, "epochs per stage")
    batch_size: int = setting(32, "batch size per process; the global batch is this times the processes")
    mcl_lr: float = setting(1e-5, "learning rate of MCL stages")
    mcl_weight_decay: float = setting(0.2, "weight decay of MCL stages")
    router_lr: float = setting(1e-6, "learning rate of router tuning")
    router_weight_decay: float = setting(0.01, "weight decay of router tuning")
    clipup_lr: float = setting(1e-5, "learning rate of clip-up")
    clipup_weight_decay: float = setting(0.1, "weight decay of clip-up")
    clipup_trainable: TrainableSet = setting("experts+router", "clip-up parameters")
    dense_lr: float = setting(1e-5, "learning rate of the dense baseline")
    dense_weight_decay: float = setting(0.2, "weight decay of the dense baseline")
    dense_trainable: TrainableSet = setting("ffn", "dense-baseline parameters")
    warmup_steps: int = setting(200, "linear warm-up steps before cosine decay")
    label_smoothing: float = setting(0.1, "contrastive label smoothing")
    temperature: float | None = setting(0.01, "fixed softmax temperature; none: the base's own learned one, "
                                              "kept frozen (the Shapes preset)")
    learn_temperature: bool = setting(False, "train the model's logit scale instead")


@dataclass
class AuxLosses:
    lb_coef_image: float = setting(0.01, "image-tower load-balancing weight")
    lb_coef_text: float = setting(0.005, "text-tower load-balancing weight")
    z_loss_coef: float = setting(0.0, "router z-loss weight (CLIP-UP)")
    local_entropy_coef: float = setting(0.0, "LIMoE local entropy weight")
    global_entropy_coef: float = setting(0.0, "LIMoE global entropy weight")
    global_entropy_min_experts: float | None = setting(None, "LIMoE soft minimum S of the global entropy "
                                                             "(threshold log S)")


@dataclass
class Inputs:
    context_length: int | None = setting(None, "text tokens (default: the base's max positions)")
    text_positions: int | None = setting(None, "stretch a base with fewer text positions to this many as "
                                               "Long-CLIP (first 20 kept, the rest interpolated; 248: the "
                                               "official CLIP-MoE's start); default: the base's own")
    val_fraction: float = setting(0.05, "pairs held out for the final retrieval check")
    max_samples: int | None = setting(None, "use only the first N pairs (default: all)")
    num_workers: int = setting(2, "data loader workers per process (0 when the pairs are decoded once)")
    decode_once: bool | None = setting(None, "decode, transform and tokenize every pair once and train from tensors "
                                             "held in memory (cached under $CLIPMOE_CACHE/decoded); default: when "
                                             "the pixels fit in 2 GiB")


@dataclass
class ShapesDefault:
    compare: bool | None = setting(None, "also run the dense and clip-up baselines and print one comparison "
                                         "table (default: on when --data is not given)")
    base_epochs: int = setting(80, "epochs of the tiny Shapes base trained from scratch (80: what the 10-minute "
                                    "build budget allows; 120 measured better, docs/results.md)")
    base_lr: float = setting(2e-3, "learning rate of the tiny Shapes base")
    shapes_scale: float = setting(1.0, "size of the generated Shapes world relative to the default "
                                       "(4,000 training pairs)")
    lr_sweep: list[float] = setting([], "with the comparison: train each recipe with its learning rates scaled by "
                                        "each of these factors (e.g. 0.5 1 2) and compare each recipe's run with "
                                        "the best held-out validation retrieval (default: the preset rates only)")


# Settings that change how a run goes, not what it computes: they may differ from the saved run_config.yaml
# when a run folder is resumed or reused. Data order depends only on (seed, epoch), the decoded pairs give
# exactly the streaming loader's batches, and checkpoints are exact; --compare and --lr-sweep only add sibling
# runs and world metrics to the diagnostics; the experts kernels compute the same function.
NEUTRAL_SETTINGS = ("output", "resume", "overwrite", "num_workers", "save_every", "tensorboard", "decode_once",
                    "compare", "lr_sweep", "stop_after_steps", "experts_implementation", "deterministic")


def _flag_list(keys) -> str:
    flags = [f"--{key.replace('_', '-')}" for key in keys]
    return ", ".join(flags[:-1]) + " and " + flags[-1]


@dataclass
class RunSettings:
    bf16: bool = setting(False, "bf16 autocast (CPU with AVX-512 BF16, or GPU)")
    seed: int = setting(0, "seed for data order, clustering, router init")
    resume: bool = setting(False, "continue the run in --output from its last checkpoint, with its saved settings "
                                  f"(only {_flag_list(NEUTRAL_SETTINGS[3:])} may change)")
    overwrite: bool = setting(False, "start over in an --output that holds a run with other settings: its run files "
                                     "(run_config.yaml, metrics.jsonl, work/, the model, ...) are deleted first")
    save_every: int = setting(50, "checkpoint every N steps within a stage")
    tensorboard: bool = setting(False, "also write the metrics as TensorBoard scalars into --output/tensorboard, "
                                       "one run per stage (needs the tensorboard package)")
    stop_after_steps: int | None = setting(None, "stop as if killed after N optimizer steps in total "
                                                 "(to test --resume)")
    deterministic: bool = setting(False, "deterministic algorithms only (torch.use_deterministic_algorithms): "
                                         "bitwise repeatable runs and resumes under every experts kernel (the "
                                         "grouped_mm and batched_mm kernels' bias gradients otherwise sum in a "
                                         "varying order), at some speed cost")


@dataclass
class UpcycleConfig:
    """Every setting of an upcycling run, by concern."""

    base: str = setting("shapes-tiny", "dense CLIP to start from: shapes-tiny (a tiny CLIP trained from scratch "
                                       "on the Shapes world, cached); " + "; ".join(BASE_SPECS))
    data: list[str] = setting([], "image-text sources: JSONL/CSV (image, caption), LLaVA/ShareGPT4V JSON "
                                  "(FILE.json::IMAGE_ROOT), img2dataset folders, WebDataset .tar shards, "
                                  "datasets folders (default: the built-in Shapes world)")
    recipe: Recipe = setting("dmu", "dmu = CLIP-MoE (MCL experts + router tuning), clip-up = sparse "
                                    "upcycling, dense = dense fine-tuning baseline")
    output: str = setting("runs/clip-moe", "output folder")
    moe: MoEShape = setting(MoEShape(), "MoE shape")
    mcl: MCLSettings = setting(MCLSettings(), "MCL (recipe dmu)")
    optim: Optimisation = setting(Optimisation(), "optimisation")
    losses: AuxLosses = setting(AuxLosses(), "auxiliary losses (added by the model from its config)")
    inputs: Inputs = setting(Inputs(), "data loading")
    shapes: ShapesDefault = setting(ShapesDefault(), "the embedded default (Shapes world)")
    run: RunSettings = setting(RunSettings(), "run")

    def validate(self, where: str = "config") -> None:
        def bad(key, message):
            raise ConfigError(f"{where}: {key} {message}")

        moe, optim = self.moe, self.optim
        if moe.num_experts < 1:
            bad("num_experts", f"must be >= 1, got {moe.num_experts}")
        if not 1 <= moe.top_k <= moe.num_experts:
            bad("top_k", f"({moe.top_k}) must be between 1 and num_experts ({moe.num_experts})")
        if self.recipe == "dmu" and self.mcl_stages() != moe.num_experts - 1:
            bad("stages", f"({self.mcl_stages()}) must equal num_experts - 1 ({moe.num_experts - 1}) for dmu: "
                          "the experts are the base FFN plus one per MCL stage")
        if self.mcl.clusters < 1:
            bad("clusters", f"must be >= 1, got {self.mcl.clusters}")
        if self.recipe == "dmu" and self.mcl.clusters == 1 and self.mcl_stages() > 1:
            raise ConfigError(
                f"{where}: clusters (--clusters) is 1 with recipe dmu: every MCL stage would then train a copy of the "
                f"base on the same batches in the same order, so experts 1 to {self.mcl_stages()} would be identical "
                "(MCL makes the experts differ through the clusters of the earlier stages); use --clusters 2 or more "
                "(CLIP-MoE: 3)")
        if self.run.resume and self.run.overwrite:
            bad("overwrite", "cannot be combined with resume: --resume continues the run in --output, --overwrite "
                             "deletes it and starts over")
        for key, value in (("epochs", optim.epochs), ("batch_size", optim.batch_size),
                           ("save_every", self.run.save_every)):
            if value < 1:
                bad(key, f"must be >= 1, got {value}")
        for key in ("mcl_lr", "router_lr", "clipup_lr", "dense_lr"):
            if getattr(optim, key) <= 0:
                bad(key, f"must be > 0, got {getattr(optim, key)}")
        if not 0 <= self.inputs.val_fraction < 1:
            bad("val_fraction", f"must be in [0, 1), got {self.inputs.val_fraction}")
        if optim.temperature is not None and optim.temperature <= 0:
            bad("temperature", f"must be > 0, got {optim.temperature}")
        if self.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
            bad("tensorboard", "(--tensorboard) needs the tensorboard package, which is not installed: pip install "
                               "tensorboard (or the project's extra: pip install 'clipmoe-vlm[tensorboard]')")

    def mcl_stages(self) -> int:
        return self.moe.num_experts - 1 if self.mcl.stages is None else self.mcl.stages

    def to_dict(self) -> dict:
        return as_dict(self)


def load_config(path: str | Path | None, flags: dict) -> UpcycleConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``flags`` (leaf name -> value); checked."""
    config = load(UpcycleConfig, path, flags)
    config.validate(str(path) if path is not None and not any(v is not None for v in flags.values()) else "config")
    return config
