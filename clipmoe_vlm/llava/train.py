"""Two-stage LLaVA-1.5 training with a CLIP-MoE (or dense CLIP) vision tower (``scripts/train_llava.py``).

Stages (LLaVA-1.5 recipe):

- ``pretrain``: projector only, ``plain`` template, caption data, lr 1e-3;
- ``finetune``: projector + language model, ``vicuna_v1`` template, instruction data, lr 2e-5;
  ``--lora``: LoRA (r 128, alpha 256) on the language model only, projector at its own lr 2e-5, LoRA at 2e-4;
  ``--bits 4|8``: QLoRA, the language model quantized with bitsandbytes, tower and projector not.
- ``--train-router`` / ``--train-experts``: also train the tower's MoE routers / experts, adding the tower's
  auxiliary loss (the tower is frozen otherwise).

Configuration: defaults <- ``--config file.yaml`` <- command-line flags (`LlavaTrainConfig`). With no data or
model arguments, the run uses the embedded Shapes world (`clipmoe_vlm.defaults.ensure_world`), the default
CLIP-MoE folder ``runs/clip-moe`` and a tiny Llama built from a config with a tokenizer trained on the world's
texts, so it runs on CPU without downloads.

Outputs (``--output-dir``): a standard LLaVA folder (model, processor, README.md model card,
``llava_train_config.json``) for full runs; an adapter folder (see `clipmoe_vlm.llava.lora`) for LoRA runs;
``checkpoint-N`` folders with optimizer, scheduler and RNG state, from which ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .. import defaults, run_config
from ..data.conversation import get_template
from ..data.llava_batching import LlavaCollator
from ..data.llava_dataset import LlavaDataset
from ..data.llava_records import load_llava_records
from ..distributed import sharded_engine
from ..run_config import add_flags, from_flags, setting
from .builder import build_llava, describe, load_llava, set_tower_experts_implementation
from .run_folder import check_output_dir, checkpoint_to_resume, clear_run_files, data_digest, write_settings

if TYPE_CHECKING:
    from .trainer import LlavaTrainer

__all__ = ["DEFAULT_OUTPUTS", "LlavaTrainConfig", "TrainResult", "build_parser", "load_config", "main", "run"]

DEFAULT_OUTPUTS = {"pretrain": defaults.RUNS / "llava-pretrain", "finetune": defaults.RUNS / "llava-finetune",
                   "finetune-lora": defaults.RUNS / "llava-lora"}
TINY_LM = "tiny-llama"
# The CPU defaults of `bash scripts/{pretrain_llava,finetune_llava,finetune_lora}.sh`, as package data.
PRESETS = {path.stem: path for path in sorted((Path(__file__).parent / "presets").glob("*.yaml"))}
_STAGE_DEFAULTS = {
    # LLaVA-1.5 scripts: scripts/v1_5/pretrain.sh, finetune.sh, finetune_lora.sh
    "pretrain": {"learning_rate": 1e-3, "template": "plain", "image_aspect_ratio": "square",
                 "group_by_modality_length": False},
    "finetune": {"learning_rate": 2e-5, "template": "vicuna_v1", "image_aspect_ratio": "pad",
                 "group_by_modality_length": True},
    "finetune-lora": {"learning_rate": 2e-4, "projector_lr": 2e-5},
}


@dataclass
class ModelSettings:
    model: str | None = setting(None, "a LLaVA folder to start from (finetune default: the pretrain output)")
    vision_tower: str | None = setting(None, "CLIP-MoE or CLIP folder (default: runs/clip-moe)")
    language_model: str = setting(TINY_LM, "causal-LM folder or hub id, or tiny-llama (built from a config with a "
                                           "tokenizer trained on the data, no download)")
    tokenizer: str | None = setting(None, "tokenizer folder or hub id (default: the language model's)")
    projector: str = setting("mlp2x_gelu", "projector type, or a file of pretrained projector weights")
    vision_feature_layer: int = setting(-2, "tower layer whose patch features feed the projector")
    tiny_lm_hidden_size: int = setting(128, "width of the tiny-llama LM")
    tiny_lm_layers: int = setting(2, "layers of the tiny-llama LM")
    tiny_vocab_size: int = setting(1024, "vocabulary of the tokenizer trained for tiny-llama")
    router_aux_loss_coef: float | None = setting(None, "load-balancing weight of the tower's routers when they "
                                                       "train (default: the tower config's)")
    router_z_loss_coef: float | None = setting(None, "router z-loss weight when the routers train (default: the "
                                                     "tower config's)")
    experts_implementation: Literal["grouped_mm", "eager", "batched_mm"] | None = setting(
        None, "experts kernel of the CLIP-MoE tower (default: eager without CUDA, grouped_mm with CUDA)")


@dataclass
class DataSettings:
    data_path: str | None = setting(None, "LLaVA JSON (default: the Shapes world's captions or instructions)")
    image_folder: str | None = setting(None, "root of the image paths (default: the JSON's folder)")
    template: str | None = setting(None, "conversation template (default: plain for pretrain, vicuna_v1 after)")
    image_aspect_ratio: Literal["square", "pad"] | None = setting(None, "pad images to a square first (pad) or "
                                                                        "resize (square); default per stage")
    model_max_length: int = setting(2048, "maximum tokens per sample (longer ones are skipped and counted)")
    strict: bool = setting(False, "fail on the first bad record instead of skipping it")
    max_samples: int | None = setting(None, "use only the first N records")
    group_by_modality_length: bool | None = setting(None, "batch image and text-only samples apart (LLaVA-1.5); "
                                                          "default per stage")
    world_seed: int = setting(0, "seed of the Shapes world used by default")


@dataclass
class TuningSettings:
    lora: bool = setting(False, "LoRA on the language model (finetune)")
    lora_r: int = setting(128, "LoRA rank")
    lora_alpha: int = setting(256, "LoRA alpha")
    lora_dropout: float = setting(0.05, "LoRA dropout")
    bits: Literal[4, 8, 16] = setting(16, "4 or 8: QLoRA (bitsandbytes-quantized LM; needs --lora)")
    train_router: bool = setting(False, "also train the tower's routers (adds the tower's aux loss)")
    train_experts: bool = setting(False, "also train the tower's experts (adds the tower's aux loss)")


@dataclass
class OptimSettings:
    learning_rate: float | None = setting(None, "peak learning rate (default: 1e-3 pretrain, 2e-5 finetune, 2e-4 "
                                                "LoRA)")
    projector_lr: float | None = setting(None, "projector learning rate (default: learning_rate; LoRA: 2e-5)")
    router_lr: float | None = setting(None, "router learning rate (default: learning_rate)")
    expert_lr: float | None = setting(None, "expert learning rate (default: learning_rate)")
    weight_decay: float = setting(0.0, "weight decay")
    warmup_ratio: float = setting(0.03, "warm-up fraction of the steps")
    lr_scheduler_type: str = setting("cosine", "transformers scheduler name")
    num_train_epochs: float = setting(1.0, "epochs")
    max_steps: int = setting(-1, "stop after N steps (-1: the epochs decide)")
    per_device_train_batch_size: int = setting(16, "batch size per device")
    gradient_accumulation_steps: int = setting(1, "gradient accumulation steps")
    gradient_checkpointing: bool = setting(False, "activation checkpointing (non-reentrant)")
    bf16: bool = setting(False, "bf16 weights and autocast (GPU or a CPU with AVX-512 BF16)")
    tf32: bool = setting(False, "TF32 matmuls (Ampere+ GPUs)")
    seed: int = setting(0, "seed of initialisation and data order")


@dataclass
class RunSettings:
    torch_threads: int | None = setting(None, "intra-op CPU threads (the CPU presets use 1: faster for tiny "
                                              "matrices on a busy machine)")
    logging_steps: int = setting(10, "log every N steps")
    save_steps: int = setting(500, "checkpoint every N steps")
    save_total_limit: int | None = setting(1, "checkpoints kept")
    dataloader_num_workers: int = setting(0, "DataLoader worker processes")
    deepspeed: str | None = setting(None, "DeepSpeed JSON config (configs/deepspeed/)")
    report_to: str = setting("none", "transformers report_to (none, tensorboard, wandb)")
    resume: bool = setting(False, "continue from the last checkpoint-N in --output-dir, with the settings saved "
                                  "there (only the run section's logging, saving, worker and thread settings and "
                                  "--experts-implementation may change)")
    overwrite: bool = setting(False, "start over in an --output-dir that holds a run with other settings: its run "
                                     "files (checkpoints, model, card, settings) are deleted first")


@dataclass
class LlavaTrainConfig:
    """Every option of a LLaVA training run, by concern. Flags and flat YAML keys use the field names (LLaVA's own
    training-argument names); YAML may also nest them by section. ``None`` means "the stage's default" (see
    `resolve`)."""

    stage: Literal["pretrain", "finetune"] = setting("pretrain", "pretrain: projector only, plain template, "
                                                                 "captions; finetune: projector + LM, instructions")
    output_dir: str | None = setting(None, "output folder (default: runs/llava-pretrain, runs/llava-finetune or "
                                           "runs/llava-lora)")
    modeling: ModelSettings = setting(ModelSettings(), "the model: a LLaVA folder to continue, or the parts to build one from")
    data: DataSettings = setting(DataSettings(), "the LLaVA data")
    tuning: TuningSettings = setting(TuningSettings(), "what trains: LoRA / QLoRA, the tower's routers and experts")
    optim: OptimSettings = setting(OptimSettings(), "optimisation (LLaVA-1.5's values)")
    run: RunSettings = setting(RunSettings(), "checkpoints, logging, workers, engines")

    def resolve(self) -> LlavaTrainConfig:
        """A copy with the stage defaults filled in and the default paths chosen; checks the combination."""
        cfg = copy.deepcopy(self)  # the sections are objects: resolving must not change the caller's config
        if cfg.run.resume and cfg.run.overwrite:
            raise ValueError("--overwrite cannot be combined with --resume: --resume continues the run in "
                             "--output-dir, --overwrite deletes it and starts over")
        if cfg.tuning.bits != 16 and not cfg.tuning.lora:
            raise ValueError("--bits 4/8 (QLoRA) needs --lora: quantized weights cannot be trained directly")
        if cfg.tuning.lora and cfg.stage != "finetune":
            raise ValueError("--lora applies to --stage finetune")
        if not cfg.run.deepspeed:
            cfg.run.deepspeed = None
        key = "finetune-lora" if cfg.tuning.lora else cfg.stage
        for source in (_STAGE_DEFAULTS[cfg.stage], _STAGE_DEFAULTS.get(key, {})):
            for name, value in source.items():
                section = getattr(cfg, run_config.section_of(LlavaTrainConfig, name)[0])
                if getattr(section, name) is None:
                    setattr(section, name, value)
        if cfg.output_dir is None:
            cfg.output_dir = str(DEFAULT_OUTPUTS[key])
        if cfg.stage == "finetune" and cfg.modeling.model is None and cfg.modeling.vision_tower is None:
            cfg.modeling.model = str(DEFAULT_OUTPUTS["pretrain"])
        if cfg.modeling.model is None and cfg.modeling.vision_tower is None:
            cfg.modeling.vision_tower = str(defaults.DEFAULT_CLIPMOE)
        if cfg.data.data_path is None or cfg.data.image_folder is None:
            world = None
            if cfg.data.data_path is None:
                world = defaults.ensure_world(cfg.data.world_seed)
                cfg.data.data_path = str(world / "llava" / ("pretrain.json" if cfg.stage == "pretrain" else "instruct.json"))
            if cfg.data.image_folder is None:
                cfg.data.image_folder = str(Path(cfg.data.data_path).parent)
        return cfg


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)
    trainer: Any = None


# --------------------------------------------------------------------------- config plumbing
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with LlavaTrainConfig keys (flags override it)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a shipped preset (the CPU defaults "
                        "of the LLaVA scripts; a --config file replaces it)")
    add_flags(parser, LlavaTrainConfig)
    return parser


def load_config(argv: list[str] | None = None) -> LlavaTrainConfig:
    """defaults <- YAML (``--config``, else ``--preset``) <- flags; every value checked when read."""
    args = build_parser().parse_args(argv)
    path = args.config or (PRESETS[args.preset] if args.preset else None)
    return run_config.load(LlavaTrainConfig, path, from_flags(args, LlavaTrainConfig))


# --------------------------------------------------------------------------- parts
def _log(message: str) -> None:
    print(f"[train_llava {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _texts_of(records: list[dict[str, Any]]) -> list[str]:
    return [str(turn.get("value", "")) for record in records for turn in record.get("conversations", [])]


def _tiny_language_model(cfg: LlavaTrainConfig, vocab_size: int):
    from transformers import LlamaConfig

    hidden = cfg.modeling.tiny_lm_hidden_size
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=cfg.modeling.tiny_lm_layers, num_attention_heads=max(1, hidden // 32),
                       num_key_value_heads=max(1, hidden // 64), max_position_embeddings=cfg.data.model_max_length,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)


@contextlib.contextmanager
def _whole_models(args):
    """Models built inside are whole, also under DeepSpeed ZeRO-3. While a ZeRO-3 config is registered, transformers
    builds every model partitioned, and CLIP's weight initialisation then fails on its position ids ("Cannot copy
    out of meta tensor"). A model built from parts is therefore built whole, on every process (one full copy each
    until the Trainer hands it to DeepSpeed, which partitions it); a LLaVA folder (``--model``) still loads
    partitioned."""
    from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config
    from transformers.integrations import unset_hf_deepspeed_config

    config = getattr(args, "hf_deepspeed_config", None)
    if config is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


def _build_model(cfg: LlavaTrainConfig, args=None):
    """Model + processor: from a LLaVA folder (``--model``) or built from tower + LM (+ pretrained projector);
    ``args``: the run's TrainingArguments (see `_whole_models`)."""
    if cfg.modeling.model is not None:
        model_dir = Path(cfg.modeling.model)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"--model {model_dir}: not a LLaVA folder (no config.json); run the pretrain "
                                    "stage first or pass --vision-tower/--language-model")
        kwargs: dict[str, Any] = {}
        if cfg.tuning.bits in (4, 8):
            from .lora import quantization_config

            kwargs["quantization_config"] = quantization_config(
                cfg.tuning.bits, torch.bfloat16 if cfg.optim.bf16 else torch.float32)
            kwargs["device_map"] = {"": _device_for_quantized()}
        elif cfg.optim.bf16:
            kwargs["dtype"] = torch.bfloat16
        return load_llava(model_dir, **kwargs)
    if cfg.tuning.bits in (4, 8):
        raise ValueError("--bits needs --model (a saved LLaVA folder, e.g. the pretrain output) to load quantized")
    tower = Path(cfg.modeling.vision_tower)
    if not (tower / "config.json").is_file():
        hint = (" (the default CLIP-MoE: build it with `clipmoe upcycle`, or train with `clipmoe train-llava`, which "
                "builds it)") if tower.resolve() == defaults.DEFAULT_CLIPMOE.resolve() else ""
        raise FileNotFoundError(f"--vision-tower {tower}: no config.json (a CLIP-MoE or CLIP folder is needed){hint}")
    dtype = torch.bfloat16 if cfg.optim.bf16 else None
    if cfg.modeling.language_model == TINY_LM:
        from ..data.tokenizer import build_local_tokenizer

        records = load_llava_records(cfg.data.data_path)
        texts = _texts_of(records) + [get_template("vicuna_v1").system]
        other = Path(cfg.data.data_path).with_name("instruct.json" if cfg.stage == "pretrain" else "pretrain.json")
        if other.is_file():
            texts += _texts_of(load_llava_records(other))
        tokenizer = build_local_tokenizer(texts, vocab_size=cfg.modeling.tiny_vocab_size, model_max_length=cfg.data.model_max_length)
        torch.manual_seed(cfg.optim.seed)
        language_model: Any = _tiny_language_model(cfg, len(tokenizer))
    else:
        language_model = cfg.modeling.language_model
        tokenizer = cfg.modeling.tokenizer or cfg.modeling.language_model
    torch.manual_seed(cfg.optim.seed)
    with _whole_models(args):
        return build_llava(str(tower), language_model, tokenizer, projector=cfg.modeling.projector,
                           vision_feature_layer=cfg.modeling.vision_feature_layer,
                           image_aspect_ratio=cfg.data.image_aspect_ratio, template="vicuna_v1", dtype=dtype)


def _device_for_quantized() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _group_lrs(cfg: LlavaTrainConfig) -> dict[str, float]:
    """Per-group learning rates that differ from ``learning_rate``."""
    lrs = {"projector": cfg.optim.projector_lr, "router": cfg.optim.router_lr, "experts": cfg.optim.expert_lr}
    return {group: lr for group, lr in lrs.items() if lr is not None}


def _set_router_losses(model, cfg: LlavaTrainConfig) -> None:
    """The tower computes its aux loss from its config; these flags set that config's coefficients."""
    tower_config = model.config.vision_config
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(cfg.modeling, name)
        if value is not None:
            if not hasattr(tower_config, name):
                raise ValueError(f"--{name.replace('_', '-')}: the vision tower is not a CLIP-MoE")
            setattr(tower_config, name, value)


def _model_card(cfg: LlavaTrainConfig, model, metrics: dict[str, Any], trainable_counts: dict[str, int],
                kind: str) -> str:
    info = describe(model)
    lines = [
        f"# LLaVA-1.5 ({cfg.stage}{', LoRA' if cfg.tuning.lora else ''}) with a {info['vision_tower']} vision tower",
        "",
        "Trained with `clipmoe-vlm` (`scripts/train_llava.py`).",
        "",
        "## Model",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        "## Training",
        "",
        f"- stage: {cfg.stage}; template: {cfg.data.template}; image_aspect_ratio: {cfg.data.image_aspect_ratio}",
        f"- data: `{cfg.data.data_path}` (images: `{cfg.data.image_folder}`)",
        f"- start: `{cfg.modeling.model or cfg.modeling.vision_tower}`; language model: `{cfg.modeling.language_model}`",
        f"- trainable parameters per group: {trainable_counts}",
        (f"- lr {cfg.optim.learning_rate} (projector {cfg.optim.projector_lr or cfg.optim.learning_rate}), {cfg.optim.lr_scheduler_type}, "
         f"warm-up {cfg.optim.warmup_ratio}, epochs {cfg.optim.num_train_epochs}, max_steps {cfg.optim.max_steps}, "
         f"batch {cfg.optim.per_device_train_batch_size} x accumulation {cfg.optim.gradient_accumulation_steps} per device"),
        (f"- LoRA: {cfg.tuning.lora} (r {cfg.tuning.lora_r}, alpha {cfg.tuning.lora_alpha}, bits {cfg.tuning.bits}); router trained: "
         f"{cfg.tuning.train_router}; experts trained: {cfg.tuning.train_experts}"),
        f"- metrics: {json.dumps(metrics, default=str)}",
        "",
        "## Loading",
        "",
        "```python",
        "import clipmoe_vlm  # registers the CLIP-MoE tower with transformers' Auto classes",
    ]
    if kind == "lora":
        lines += ["from clipmoe_vlm.llava.lora import load_lora_llava",
                  "model, processor = load_lora_llava('<this folder>', merge=True)",
                  "```", "", "Merge into a full folder: `python scripts/merge_lora.py <this folder> <output>`."]
    else:
        lines += ["from transformers import AutoProcessor, LlavaForConditionalGeneration",
                  "model = LlavaForConditionalGeneration.from_pretrained('<this folder>')",
                  "processor = AutoProcessor.from_pretrained('<this folder>')", "```"]
    lines += ["", ("Answer questions: `python scripts/llava_infer.py --model <this folder> --image img.png "
                   "--question '...'`."), ""]
    return "\n".join(lines)


_REPAIRS = ("image_placeholder_added", "truncated", "trailing_turn_dropped", "tokenization_mismatch")


def _data_report(dataset: LlavaDataset, examples: int = 3) -> list[str]:
    """End-of-run lines about the samples the dataset skipped or changed (the model card has only the raw counts).

    `DataStats` keeps counts, not record ids; only missing images can be named afterwards, by looking for the
    files again (cheap: one stat per image record, stopping at ``examples``)."""
    counts = dataset.stats.as_dict()
    skipped = {reason: counts[f"skipped.{reason}"] for reason in dataset.stats.SKIP_REASONS
               if counts[f"skipped.{reason}"]}
    repaired = {name: counts[name] for name in _REPAIRS if counts[name]}
    if not skipped and not repaired:
        return [f"data: {counts['samples']} samples served, none skipped or repaired"]
    lines = [(f"data: {counts['samples']} samples served; counted per sample drawn (a record drawn in every epoch "
              "counts every time)")]
    if skipped:
        lines.append(f"skipped (the next usable sample served instead): {sum(skipped.values())}: "
                     + ", ".join(f"{reason} {count}" for reason, count in skipped.items()))
    if repaired:
        lines.append("repaired or changed: " + ", ".join(f"{name} {count}" for name, count in repaired.items()))
    if skipped.get("missing_image") and dataset.image_root is not None:
        found = []
        for index, record in enumerate(dataset.records):
            if dataset.has_image[index] and not (dataset.image_root / str(record["image"])).is_file():
                found.append(f"record {index} (id={record.get('id')!r}): {dataset.image_root / str(record['image'])}")
                if len(found) == examples:
                    break
        lines += [f"  missing image: {entry}" for entry in found]
    if set(skipped) - {"missing_image"} or repaired:
        lines.append("  the counters keep no record ids for the other reasons; --strict stops at the first record "
                     "with a malformed conversation or <image> placeholder, naming it")
    return lines


# --------------------------------------------------------------------------- run
def run(config: LlavaTrainConfig) -> TrainResult:
    """Train one stage as configured and save the result; returns where it went."""
    from transformers import TrainingArguments

    from .trainable import configure_trainable, summarize_trainable
    from .trainer import LlavaTrainer

    cfg = config.resolve()
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    output_dir = Path(cfg.output_dir)
    _log(f"stage {cfg.stage}{f' (LoRA, {cfg.tuning.bits}-bit)' if cfg.tuning.lora else ''}: data {cfg.data.data_path}, "
         f"output {output_dir}")
    image_root = Path(cfg.data.image_folder)
    if not image_root.is_dir():
        raise FileNotFoundError(f"--image-folder {image_root} is not a directory")
    # TrainingArguments first: with a ZeRO-3 DeepSpeed config it makes from_pretrained load the weights
    # partitioned (transformers' HfDeepSpeedConfig)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.optim.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        learning_rate=cfg.optim.learning_rate,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=float(cfg.optim.warmup_ratio),  # a float in [0, 1) is a ratio of the total steps (transformers 5)
        lr_scheduler_type=cfg.optim.lr_scheduler_type,
        num_train_epochs=cfg.optim.num_train_epochs,
        max_steps=cfg.optim.max_steps,
        logging_steps=cfg.run.logging_steps,
        save_strategy="steps",
        save_steps=cfg.run.save_steps,
        save_total_limit=cfg.run.save_total_limit,
        bf16=cfg.optim.bf16,
        tf32=cfg.optim.tf32 or None,
        activation_checkpointing=cfg.optim.gradient_checkpointing and cfg.tuning.bits == 16,
        activation_checkpointing_kwargs={"use_reentrant": False},  # non-reentrant: router aux-loss grads flow
        dataloader_num_workers=cfg.run.dataloader_num_workers,
        remove_unused_columns=False,
        report_to=cfg.run.report_to,
        seed=cfg.optim.seed,
        data_seed=cfg.optim.seed,
        deepspeed=cfg.run.deepspeed,
        disable_tqdm=True,
        save_only_model=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    data_sha256 = _take_output_dir(cfg)
    model, processor = _build_model(cfg, args)
    _set_router_losses(model, cfg)
    if cfg.modeling.experts_implementation is not None:
        set_tower_experts_implementation(model, cfg.modeling.experts_implementation)
    tokenizer = processor.tokenizer
    # the saved processor pads at inference exactly when this stage trained on padded images
    processor.image_processor.do_pad = cfg.data.image_aspect_ratio == "pad"
    if cfg.stage == "pretrain" and cfg.modeling.model is None:
        _log(f"built LLaVA: {json.dumps(describe(model))}")

    if cfg.tuning.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.optim.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    base_model = model
    lora_base = cfg.modeling.model
    if cfg.tuning.lora:
        from .lora import apply_lora

        if lora_base is None:  # built from parts here: keep the base next to the adapter
            from accelerate import PartialState

            lora_base = str(output_dir / "base")
            if PartialState().is_main_process:
                model.save_pretrained(lora_base)
                processor.save_pretrained(lora_base)
            PartialState().wait_for_everyone()

        # LoRA's initial matrices from the run's seed: the same in every process (FSDP shards each process's own
        # copy, it broadcasts nothing) and in every run
        torch.manual_seed(cfg.optim.seed)
        model = apply_lora(model, r=cfg.tuning.lora_r, alpha=cfg.tuning.lora_alpha, dropout=cfg.tuning.lora_dropout)
    trainable = configure_trainable(model, cfg.stage, lora=cfg.tuning.lora, train_router=cfg.tuning.train_router,
                                    train_experts=cfg.tuning.train_experts)
    counts = summarize_trainable(model)
    _log(f"trainable parameters: {counts}")

    records: Any = cfg.data.data_path
    if cfg.data.max_samples is not None:
        records = load_llava_records(cfg.data.data_path)[: cfg.data.max_samples]
    dataset = LlavaDataset(records, tokenizer, cfg.data.template, num_image_tokens=base_model.config.image_seq_length,
                           image_root=image_root, image_processor=processor.image_processor,
                           image_aspect_ratio=cfg.data.image_aspect_ratio, model_max_length=cfg.data.model_max_length,
                           strict=cfg.data.strict, on_mismatch="raise" if cfg.data.strict else "skip")
    if cfg.data.strict:
        for index in range(len(dataset)):  # fail before training, naming the record
            dataset[index]
        dataset.stats.reset()
    _log(f"{len(dataset)} samples ({sum(dataset.has_image)} with an image), template {cfg.data.template}, "
         f"{base_model.config.image_seq_length} image tokens")

    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=LlavaCollator(pad_token_id=tokenizer.pad_token_id),
        group_lrs=_group_lrs(cfg), aux_loss=cfg.tuning.train_router or cfg.tuning.train_experts,
        group_by_modality_length=bool(cfg.data.group_by_modality_length),
    )
    resume_from = None
    if cfg.run.resume and output_dir.is_dir():  # `_take_output_dir` checked that its settings are these
        resume_from = _checkpoint_to_resume(trainer, output_dir)
    started = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    metrics = dict(train_output.metrics)
    metrics["wall_seconds"] = round(time.time() - started, 1)
    metrics["global_step"] = trainer.state.global_step
    metrics["data"] = dataset.stats.as_dict()
    _log(f"done in {metrics['wall_seconds']} s, step {trainer.state.global_step}, "
         f"train_loss {metrics.get('train_loss')}")

    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.tuning.lora:
        trainer.save_lora_run(output_dir, base_folder=lora_base)  # gathers sharded weights first (FSDP, ZeRO-3)
        kind = "lora"
    else:
        trainer.save_model(str(output_dir))
        kind = "full"
    if trainer.args.should_save:  # the main process writes the folder's own files
        processor.save_pretrained(output_dir)
        write_settings(cfg, data_sha256)
        (output_dir / "README.md").write_text(_model_card(cfg, base_model, metrics, counts, kind))
    _log(f"saved {output_dir}")
    for line in _data_report(dataset):  # last, where a user looks when the run ends
        _log(line)
    return TrainResult(output_dir=output_dir, metrics=metrics, trainable=trainable, trainer=trainer)


def _checkpoint_to_resume(trainer: LlavaTrainer, output_dir: Path) -> str | None:
    """`run_folder.checkpoint_to_resume` on every process; the main one then deletes the checkpoints the run was
    killed while writing (the Trainer would otherwise write that step again into them, and rotate by them)."""
    accelerator = trainer.accelerator
    chosen, partial = checkpoint_to_resume(output_dir, sharded_engine(accelerator), accelerator.num_processes)
    accelerator.wait_for_everyone()  # every process has listed the folder
    for folder in partial:
        _log(f"{folder}: not completely written (the run stopped while saving it); deleted")
        if trainer.args.should_save:
            shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    _log(f"resuming from {chosen}" if chosen else f"--resume: no checkpoint in {output_dir}; starting fresh")
    return str(chosen) if chosen else None


def _take_output_dir(cfg: LlavaTrainConfig) -> str | None:
    """Checks ``--output-dir`` against the run (`run_folder.check_output_dir`; every process reads it before the
    main one changes it), then clears what the run replaces and writes its settings first; returns the data's
    digest (saved with the settings)."""
    from accelerate import PartialState

    state = PartialState()  # made by TrainingArguments: one process, or the launched ones
    data_sha256 = data_digest(cfg)
    mode = check_output_dir(cfg, data_sha256)
    state.wait_for_everyone()
    output_dir = Path(cfg.output_dir)
    if state.is_main_process:
        if mode == "overwrite":
            clear_run_files(output_dir)
        elif mode == "restart":  # its checkpoints would mix with this run's
            clear_run_files(output_dir, checkpoints_only=True)
        write_settings(cfg, data_sha256)
    state.wait_for_everyone()
    _log({"new": f"new run in {output_dir}", "resume": f"continuing the run in {output_dir}",
          "restart": f"{output_dir} holds a run with the same settings: starting it again from the beginning "
                     "(--resume continues it from its last checkpoint)",
          "overwrite": f"--overwrite: the run files of {output_dir} deleted, starting over"}[mode])
    return data_sha256


def main(argv: list[str] | None = None) -> Path:
    """Entry point of ``scripts/train_llava.py``; returns the output folder."""
    config = load_config(argv if argv is not None else sys.argv[1:])
    return run(config).output_dir
