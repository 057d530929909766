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
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import defaults
from ..data.conversation import get_template
from ..data.llava_dataset import LlavaCollator, LlavaDataset, load_llava_records
from .builder import build_llava, describe, load_llava

__all__ = ["DEFAULT_OUTPUTS", "LlavaTrainConfig", "TrainResult", "build_parser", "load_config", "main", "run"]

DEFAULT_OUTPUTS = {"pretrain": defaults.RUNS / "llava-pretrain", "finetune": defaults.RUNS / "llava-finetune",
                   "finetune-lora": defaults.RUNS / "llava-lora"}
TINY_LM = "tiny-llama"
_STAGE_DEFAULTS = {
    # LLaVA-1.5 scripts: scripts/v1_5/pretrain.sh, finetune.sh, finetune_lora.sh
    "pretrain": {"learning_rate": 1e-3, "template": "plain", "image_aspect_ratio": "square",
                 "group_by_modality_length": False},
    "finetune": {"learning_rate": 2e-5, "template": "vicuna_v1", "image_aspect_ratio": "pad",
                 "group_by_modality_length": True},
    "finetune-lora": {"learning_rate": 2e-4, "projector_lr": 2e-5},
}


@dataclass
class LlavaTrainConfig:
    """Every option of a LLaVA training run (YAML keys and ``--flags`` use these names, ``-`` for ``_``).

    ``None`` means "the stage's default" (see `resolve`)."""

    stage: str = "pretrain"
    output_dir: str | None = None
    # model
    model: str | None = None  # a LLaVA folder to start from (finetune: the pretrain output)
    vision_tower: str | None = None  # CLIP-MoE / CLIP folder (default runs/clip-moe)
    language_model: str = TINY_LM  # causal-LM folder / hub id, or "tiny-llama"
    tokenizer: str | None = None  # default: the language model's
    projector: str = "mlp2x_gelu"  # or pretrained projector weights
    vision_feature_layer: int = -2
    tiny_lm_hidden_size: int = 128
    tiny_lm_layers: int = 2
    tiny_vocab_size: int = 1024
    # data
    data_path: str | None = None
    image_folder: str | None = None
    template: str | None = None
    image_aspect_ratio: str | None = None
    model_max_length: int = 2048
    strict: bool = False
    max_samples: int | None = None
    group_by_modality_length: bool | None = None
    # what trains
    lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    bits: int = 16
    train_router: bool = False
    train_experts: bool = False
    # optimisation (LLaVA-1.5 values)
    learning_rate: float | None = None
    projector_lr: float | None = None
    router_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    bf16: bool = False
    tf32: bool = False
    seed: int = 0
    # bookkeeping
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 1
    dataloader_num_workers: int = 0
    deepspeed: str | None = None
    report_to: str = "none"
    resume: bool = False
    world_seed: int = 0

    def resolve(self) -> LlavaTrainConfig:
        """A copy with the stage defaults filled in and the default paths chosen; checks the combination."""
        cfg = dataclasses.replace(self)
        if cfg.stage not in ("pretrain", "finetune"):
            raise ValueError(f"--stage must be 'pretrain' or 'finetune', got {cfg.stage!r}")
        if cfg.bits not in (4, 8, 16):
            raise ValueError(f"--bits must be 4, 8 or 16, got {cfg.bits}")
        if cfg.bits != 16 and not cfg.lora:
            raise ValueError("--bits 4/8 (QLoRA) needs --lora: quantized weights cannot be trained directly")
        if cfg.lora and cfg.stage != "finetune":
            raise ValueError("--lora applies to --stage finetune")
        if not cfg.deepspeed:
            cfg.deepspeed = None
        key = "finetune-lora" if cfg.lora else cfg.stage
        for source in (_STAGE_DEFAULTS[cfg.stage], _STAGE_DEFAULTS.get(key, {})):
            for name, value in source.items():
                if name in {f.name for f in dataclasses.fields(self)} and getattr(self, name) is None:
                    setattr(cfg, name, value)
        if cfg.output_dir is None:
            cfg.output_dir = str(DEFAULT_OUTPUTS[key])
        if cfg.stage == "finetune" and cfg.model is None and cfg.vision_tower is None:
            cfg.model = str(DEFAULT_OUTPUTS["pretrain"])
        if cfg.model is None and cfg.vision_tower is None:
            cfg.vision_tower = str(defaults.DEFAULT_CLIPMOE)
        if cfg.data_path is None or cfg.image_folder is None:
            world = None
            if cfg.data_path is None:
                world = defaults.ensure_world(cfg.world_seed)
                cfg.data_path = str(world / "llava" / ("pretrain.json" if cfg.stage == "pretrain" else "instruct.json"))
            if cfg.image_folder is None:
                cfg.image_folder = str(Path(cfg.data_path).parent)
        return cfg


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)
    trainer: Any = None


# --------------------------------------------------------------------------- config plumbing
def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_llava.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file with LlavaTrainConfig keys (flags override it)")
    for f in dataclasses.fields(LlavaTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind == "bool" or kind == "bool | None":
            parser.add_argument(flag, nargs="?", const=True, default=None, type=_parse_bool, help=f"(bool) {f.name}")
        elif kind.startswith("int"):
            parser.add_argument(flag, type=int, default=None, help=f"{f.name} (default {f.default})")
        elif kind.startswith("float"):
            parser.add_argument(flag, type=float, default=None, help=f"{f.name} (default {f.default})")
        else:
            parser.add_argument(flag, default=None, help=f"{f.name} (default {f.default})")
    return parser


def load_config(argv: list[str] | None = None) -> LlavaTrainConfig:
    """defaults <- YAML (``--config``) <- flags."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config: {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of option names")
        known = {f.name for f in dataclasses.fields(LlavaTrainConfig)}
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"--config {path}: unknown key {key!r}")
            values[name] = value
    for name, value in vars(args).items():
        if name != "config" and value is not None:
            values[name] = value
    return LlavaTrainConfig(**values)


# --------------------------------------------------------------------------- parts
def _log(message: str) -> None:
    print(f"[train_llava {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _texts_of(records: list[dict[str, Any]]) -> list[str]:
    return [str(turn.get("value", "")) for record in records for turn in record.get("conversations", [])]


def _tiny_language_model(cfg: LlavaTrainConfig, vocab_size: int):
    from transformers import LlamaConfig

    hidden = cfg.tiny_lm_hidden_size
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=cfg.tiny_lm_layers, num_attention_heads=max(1, hidden // 32),
                       num_key_value_heads=max(1, hidden // 64), max_position_embeddings=cfg.model_max_length,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _build_model(cfg: LlavaTrainConfig):
    """Model + processor: from a LLaVA folder (``--model``) or built from tower + LM (+ pretrained projector)."""
    if cfg.model is not None:
        model_dir = Path(cfg.model)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"--model {model_dir}: not a LLaVA folder (no config.json); run the pretrain "
                                    "stage first or pass --vision-tower/--language-model")
        kwargs: dict[str, Any] = {}
        if cfg.bits in (4, 8):
            from .lora import quantization_config

            kwargs["quantization_config"] = quantization_config(
                cfg.bits, torch.bfloat16 if cfg.bf16 else torch.float32)
            kwargs["device_map"] = {"": _device_for_quantized()}
        elif cfg.bf16:
            kwargs["dtype"] = torch.bfloat16
        return load_llava(model_dir, **kwargs)
    if cfg.bits in (4, 8):
        raise ValueError("--bits needs --model (a saved LLaVA folder, e.g. the pretrain output) to load quantized")
    tower = Path(cfg.vision_tower)
    if not (tower / "config.json").is_file():
        if tower.resolve() == defaults.DEFAULT_CLIPMOE.resolve():
            _build_default_tower(tower)
        if not (tower / "config.json").is_file():
            raise FileNotFoundError(f"--vision-tower {tower}: no config.json (a CLIP-MoE or CLIP folder is needed)")
    dtype = torch.bfloat16 if cfg.bf16 else None
    if cfg.language_model == TINY_LM:
        from ..data.tokenizer import build_local_tokenizer

        records = load_llava_records(cfg.data_path)
        texts = _texts_of(records) + [get_template("vicuna_v1").system]
        other = Path(cfg.data_path).with_name("instruct.json" if cfg.stage == "pretrain" else "pretrain.json")
        if other.is_file():
            texts += _texts_of(load_llava_records(other))
        tokenizer = build_local_tokenizer(texts, vocab_size=cfg.tiny_vocab_size, model_max_length=cfg.model_max_length)
        torch.manual_seed(cfg.seed)
        language_model: Any = _tiny_language_model(cfg, len(tokenizer))
    else:
        language_model = cfg.language_model
        tokenizer = cfg.tokenizer or cfg.language_model
    torch.manual_seed(cfg.seed)
    return build_llava(str(tower), language_model, tokenizer, projector=cfg.projector,
                       vision_feature_layer=cfg.vision_feature_layer, image_aspect_ratio=cfg.image_aspect_ratio,
                       template="vicuna_v1", dtype=dtype)


def _build_default_tower(tower: Path) -> None:
    """Runs ``python scripts/upcycle_encoder.py`` (no arguments), which writes the default CLIP-MoE folder."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "scripts" / "upcycle_encoder.py"
    _log(f"{tower} missing: building the default CLIP-MoE with `python {script}`")
    if not script.is_file():
        raise FileNotFoundError(f"--vision-tower {tower} is missing and {script} is not there to build it")
    done = subprocess.run([sys.executable, str(script)], check=False)
    if done.returncode != 0 or not (tower / "config.json").is_file():
        raise FileNotFoundError(f"--vision-tower {tower}: `python {script}` did not produce it (exit code "
                                f"{done.returncode}); build a CLIP-MoE folder and pass --vision-tower")


def _device_for_quantized() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _group_lrs(cfg: LlavaTrainConfig) -> dict[str, float]:
    lrs = {}
    if cfg.projector_lr is not None:
        lrs["projector"] = cfg.projector_lr
    if cfg.router_lr is not None:
        lrs["router"] = cfg.router_lr
        lrs["experts"] = cfg.router_lr
    return lrs


def _model_card(cfg: LlavaTrainConfig, model, metrics: dict[str, Any], trainable_counts: dict[str, int],
                kind: str) -> str:
    info = describe(model)
    lines = [
        f"# LLaVA-1.5 ({cfg.stage}{', LoRA' if cfg.lora else ''}) with a {info['vision_tower']} vision tower",
        "",
        "Trained with `clipmoe-vlm` (`scripts/train_llava.py`).",
        "",
        "## Model",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        "## Training",
        "",
        f"- stage: {cfg.stage}; template: {cfg.template}; image_aspect_ratio: {cfg.image_aspect_ratio}",
        f"- data: `{cfg.data_path}` (images: `{cfg.image_folder}`)",
        f"- start: `{cfg.model or cfg.vision_tower}`; language model: `{cfg.language_model}`",
        f"- trainable parameters per group: {trainable_counts}",
        (f"- lr {cfg.learning_rate} (projector {cfg.projector_lr or cfg.learning_rate}), {cfg.lr_scheduler_type}, "
         f"warm-up {cfg.warmup_ratio}, epochs {cfg.num_train_epochs}, max_steps {cfg.max_steps}, "
         f"batch {cfg.per_device_train_batch_size} x accumulation {cfg.gradient_accumulation_steps} per device"),
        (f"- LoRA: {cfg.lora} (r {cfg.lora_r}, alpha {cfg.lora_alpha}, bits {cfg.bits}); router trained: "
         f"{cfg.train_router}; experts trained: {cfg.train_experts}"),
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


# --------------------------------------------------------------------------- run
def run(config: LlavaTrainConfig) -> TrainResult:
    """Train one stage as configured and save the result; returns where it went."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from .trainer import LlavaTrainer, configure_trainable, summarize_trainable

    cfg = config.resolve()
    output_dir = Path(cfg.output_dir)
    _log(f"stage {cfg.stage}{f' (LoRA, {cfg.bits}-bit)' if cfg.lora else ''}: data {cfg.data_path}, "
         f"output {output_dir}")
    image_root = Path(cfg.image_folder)
    if not image_root.is_dir():
        raise FileNotFoundError(f"--image-folder {image_root} is not a directory")
    # TrainingArguments first: with a ZeRO-3 DeepSpeed config it makes from_pretrained load the weights
    # partitioned (transformers' HfDeepSpeedConfig)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=float(cfg.warmup_ratio),  # a float in [0, 1) is a ratio of the total steps (transformers 5)
        lr_scheduler_type=cfg.lr_scheduler_type,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        bf16=cfg.bf16,
        tf32=cfg.tf32 or None,
        activation_checkpointing=cfg.gradient_checkpointing and cfg.bits == 16,
        activation_checkpointing_kwargs={"use_reentrant": False},  # non-reentrant: router aux-loss grads flow
        dataloader_num_workers=cfg.dataloader_num_workers,
        remove_unused_columns=False,
        report_to=cfg.report_to,
        seed=cfg.seed,
        data_seed=cfg.seed,
        deepspeed=cfg.deepspeed,
        disable_tqdm=True,
        save_only_model=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    model, processor = _build_model(cfg)
    tokenizer = processor.tokenizer
    # the saved processor pads at inference exactly when this stage trained on padded images
    processor.image_processor.do_pad = cfg.image_aspect_ratio == "pad"
    if cfg.stage == "pretrain" and cfg.model is None:
        _log(f"built LLaVA: {json.dumps(describe(model))}")

    if cfg.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    base_model = model
    lora_base = cfg.model
    if cfg.lora:
        from .lora import apply_lora

        if lora_base is None:  # built from parts here: keep the base next to the adapter
            lora_base = str(output_dir / "base")
            model.save_pretrained(lora_base)
            processor.save_pretrained(lora_base)

        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    trainable = configure_trainable(model, cfg.stage, lora=cfg.lora, train_router=cfg.train_router,
                                    train_experts=cfg.train_experts)
    counts = summarize_trainable(model)
    _log(f"trainable parameters: {counts}")

    records: Any = cfg.data_path
    if cfg.max_samples is not None:
        records = load_llava_records(cfg.data_path)[: cfg.max_samples]
    dataset = LlavaDataset(records, tokenizer, cfg.template, num_image_tokens=base_model.config.image_seq_length,
                           image_root=image_root, image_processor=processor.image_processor,
                           image_aspect_ratio=cfg.image_aspect_ratio, model_max_length=cfg.model_max_length,
                           strict=cfg.strict, on_mismatch="raise" if cfg.strict else "skip")
    if cfg.strict:
        for index in range(len(dataset)):  # fail before training, naming the record
            dataset[index]
        dataset.stats.reset()
    _log(f"{len(dataset)} samples ({sum(dataset.has_image)} with an image), template {cfg.template}, "
         f"{base_model.config.image_seq_length} image tokens")

    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=LlavaCollator(pad_token_id=tokenizer.pad_token_id),
        group_lrs=_group_lrs(cfg), aux_loss=cfg.train_router or cfg.train_experts,
        group_by_modality_length=bool(cfg.group_by_modality_length),
    )
    resume_from = None
    if cfg.resume and output_dir.is_dir():
        resume_from = get_last_checkpoint(str(output_dir))
        _log(f"resuming from {resume_from}" if resume_from else f"--resume: no checkpoint in {output_dir}; "
             "starting fresh")
    started = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    metrics = dict(train_output.metrics)
    metrics["wall_seconds"] = round(time.time() - started, 1)
    metrics["global_step"] = trainer.state.global_step
    metrics["data"] = dataset.stats.as_dict()
    _log(f"done in {metrics['wall_seconds']} s, step {trainer.state.global_step}, "
         f"train_loss {metrics.get('train_loss')}")

    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.lora:
        from .lora import save_lora

        save_lora(model, output_dir, base_folder=lora_base)
        kind = "lora"
    else:
        trainer.save_model(str(output_dir))
        kind = "full"
    processor.save_pretrained(output_dir)
    (output_dir / "llava_train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    (output_dir / "README.md").write_text(_model_card(cfg, base_model, metrics, counts, kind))
    _log(f"saved {output_dir}")
    return TrainResult(output_dir=output_dir, metrics=metrics, trainable=trainable, trainer=trainer)


def main(argv: list[str] | None = None) -> Path:
    """Entry point of ``scripts/train_llava.py``; returns the output folder."""
    config = load_config(argv if argv is not None else sys.argv[1:])
    if os.environ.get("CLIPMOE_LLAVA_DRY_RUN"):
        print(json.dumps(dataclasses.asdict(config.resolve()), indent=2))
        return Path(config.resolve().output_dir)
    return run(config).output_dir
