"""The upcycling run's typed configuration: defaults <- YAML file <- command-line flags.

One dataclass holds every setting; `load_config` merges a YAML file (unknown keys fail, naming the file and key)
and the flags the user gave. Defaults follow CLIP-MoE's official code: MCL stages at lr 1e-5 / wd 0.2, routers
at lr 1e-6 / wd 0.01, 200 warm-up steps then cosine, label smoothing 0.1, fixed temperature 0.01, top-2 of 4
experts in every layer of both towers, expert dropout 0.1, load balancing 0.01 (image) and 0.005 (text).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["RECIPES", "UpcycleConfig", "load_config"]

RECIPES = ("dmu", "clip-up", "dense")


@dataclass
class UpcycleConfig:
    # what
    base: str = "shapes-tiny"
    data: list[str] = field(default_factory=list)  # empty: the built-in Shapes world
    recipe: str = "dmu"
    output: str = "runs/clip-moe"
    # MoE shape
    num_experts: int = 4
    top_k: int = 2
    moe_layers: str = "all"
    expert_dropout: float = 0.1
    router_jitter_noise: float = 0.0
    capacity_factor: float | None = None
    batch_priority_routing: bool = False
    norm_topk_prob: bool = True
    # MCL (dmu)
    stages: int | None = None  # MCL stages; default num_experts - 1
    clusters: int = 3  # k-means clusters per modality per stage
    mcl_leftover: str = "drop"
    # optimisation
    epochs: int = 1
    batch_size: int = 32  # per process
    mcl_lr: float = 1e-5
    mcl_weight_decay: float = 0.2
    router_lr: float = 1e-6
    router_weight_decay: float = 0.01
    clipup_lr: float = 1e-5
    clipup_weight_decay: float = 0.1
    clipup_trainable: str = "experts+router"
    dense_lr: float = 1e-5
    dense_weight_decay: float = 0.2
    dense_trainable: str = "ffn"
    warmup_steps: int = 200
    label_smoothing: float = 0.1
    temperature: float | None = 0.01  # None: the base model's own learned temperature, kept frozen
    learn_temperature: bool = False
    # auxiliary losses
    lb_coef_image: float = 0.01
    lb_coef_text: float = 0.005
    z_loss_coef: float = 0.0
    local_entropy_coef: float = 0.0
    global_entropy_coef: float = 0.0
    global_entropy_min_experts: float | None = None
    # data
    context_length: int | None = None
    val_fraction: float = 0.05
    max_samples: int | None = None
    num_workers: int = 2
    # the embedded default (Shapes world)
    compare: bool | None = None  # also run the baselines and print the comparison table (default: with Shapes data)
    base_epochs: int = 8  # epochs of the tiny dense base trained from scratch on the Shapes world
    base_lr: float = 2e-3
    shapes_scale: float = 1.0  # size of the generated world relative to the default (4,000 training pairs)
    # run
    bf16: bool = False
    seed: int = 0
    resume: bool = False
    save_every: int = 50
    tensorboard: bool = False
    stop_after_steps: int | None = None

    def validate(self, where: str = "config") -> None:
        def bad(key, message):
            raise ValueError(f"{where}: {key} {message}")

        if self.recipe not in RECIPES:
            bad("recipe", f"must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.num_experts < 1:
            bad("num_experts", f"must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            bad("top_k", f"({self.top_k}) must be between 1 and num_experts ({self.num_experts})")
        if self.recipe == "dmu" and self.mcl_stages() != self.num_experts - 1:
            bad("stages", f"({self.mcl_stages()}) must equal num_experts - 1 ({self.num_experts - 1}) for dmu: "
                          "the experts are the base FFN plus one per MCL stage")
        if self.clusters < 1:
            bad("clusters", f"must be >= 1, got {self.clusters}")
        if self.mcl_leftover not in ("drop", "mixed"):
            bad("mcl_leftover", f"must be drop or mixed, got {self.mcl_leftover!r}")
        for key in ("epochs", "batch_size", "save_every"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.temperature is not None and self.temperature <= 0:
            bad("temperature", f"must be > 0, got {self.temperature}")

    def mcl_stages(self) -> int:
        return self.num_experts - 1 if self.stages is None else self.stages

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: dict) -> UpcycleConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (the flags given)."""
    values: dict = {}
    known = {f.name for f in dataclasses.fields(UpcycleConfig)}
    where = "command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: file not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        for key, value in loaded.items():
            key_norm = key.replace("-", "_")
            if key_norm not in known:
                raise ValueError(f"{path}: unknown key '{key}' (valid keys: {', '.join(sorted(known))})")
            values[key_norm] = value
        where = str(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    config = UpcycleConfig(**values)
    config.validate(where if path is not None and not overrides else "config")
    return config
