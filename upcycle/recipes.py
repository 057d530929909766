"""The upcycling recipes: ``dmu`` (CLIP-MoE), ``clip-up`` (sparse upcycling) and ``dense`` (the baseline).

- ``dmu``, Diversified Multiplet Upcycling (arXiv 2409.19291): for s = 1..N-1, cluster the pairs with the
  stage s-1 model (k-means per modality, labels accumulated), train a copy of the *base* with only the FFNs of
  both towers trainable on cluster-homogeneous global batches, keep its FFNs; assemble experts
  [base FFN, stage 1, ..., stage N-1] into top-k MoE layers; train the routers only with the CLIP loss plus load
  balancing (0.01 image, 0.005 text).
- ``clip-up``, sparse upcycling (arXiv 2502.00965): experts are copies of the dense FFN, experts and routers (or
  every weight) train with load balancing and router z-loss, optionally with a capacity factor.
- ``dense``: continued contrastive training of the dense model on the same data (the FFNs by default, as the
  MCL stages), the fair baseline.

LIMoE's local and global entropy losses can be added to any MoE stage (``local_entropy_coef``,
``global_entropy_coef``, ``global_entropy_min_experts``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from clipmoe_vlm import CLIPMoEModel
from clipmoe_vlm.convert import sparse_upcycle, stretch_text_positions
from clipmoe_vlm.defaults import cache_dir
from clipmoe_vlm.files import atomic_write_text
from clipmoe_vlm.loading import load_clip
from clipmoe_vlm.run_config import changed_settings, read_saved_settings, refuse_changed_settings

from .config import NEUTRAL_SETTINGS, UpcycleConfig
from .diagnostics import expert_diversity, stage_table
from .engine import Engine, MetricsLog, StageSpec, embed_pairs, paired_recall
from .mcl import UNREADABLE, accumulate_labels, kmeans_labels

__all__ = ["check_output_folder", "decode_once", "make_engine", "run_inputs", "run_upcycling", "stage",
           "validation_split"]

# What a run writes into its folder (deleted by --overwrite); the first five mark a folder as holding a run
RUN_FILES = ("run_config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "work", "config.json",
             "README.md", "comparison.md", "comparison.json", "tensorboard", ".model.tmp")

INPUTS_FILE = "inputs.json"  # under work/: what the result depends on beyond the settings (`run_inputs`)

_MLP = re.compile(r"\.mlp\.fc[12]\.(weight|bias)$")


def _moe_options(cfg: UpcycleConfig) -> dict:
    """The MoE config fields of the run: routing, and the router-loss coefficients the model applies itself."""
    moe, losses = cfg.moe, cfg.losses
    return dict(expert_dropout=moe.expert_dropout, router_jitter_noise=moe.router_jitter_noise,
                capacity_factor=moe.capacity_factor, batch_priority_routing=moe.batch_priority_routing,
                norm_topk_prob=moe.norm_topk_prob, experts_implementation=moe.experts_implementation,
                router_z_loss_coef=losses.z_loss_coef,
                router_local_entropy_coef=losses.local_entropy_coef,
                router_global_entropy_coef=losses.global_entropy_coef,
                router_global_entropy_min_experts=losses.global_entropy_min_experts,
                vision_options={"router_aux_loss_coef": losses.lb_coef_image},
                text_options={"router_aux_loss_coef": losses.lb_coef_text})


def stage(cfg: UpcycleConfig, name: str, trainable: str, lr: float, weight_decay: float, labels: np.ndarray,
          **overrides) -> StageSpec:
    """A stage with the run's optimisation settings; ``overrides`` are explicit per-stage values."""
    optim = cfg.optim
    values = dict(epochs=optim.epochs, batch_size=optim.batch_size, warmup_steps=optim.warmup_steps,
                  label_smoothing=optim.label_smoothing, temperature=optim.temperature,
                  learn_temperature=optim.learn_temperature)
    values.update(overrides)
    return StageSpec(name, trainable, lr, weight_decay, labels, **values)


def validation_split(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """(n,) batch labels: 0 for training pairs, -1 for the held-out validation pairs (the same for every run
    with this seed, the embedded base's included)."""
    labels = np.zeros(n, dtype=np.int64)
    n_val = int(round(n * val_fraction))
    if n_val:
        labels[np.random.default_rng(seed).permutation(n)[:n_val]] = -1
    return labels


def decode_once(dataset, decode: bool | None, accelerator):
    """``dataset`` as `DecodedPairs` (decoded once, cached) when asked, or by default when its pixels fit in
    memory; the streaming dataset otherwise. The main process decodes and caches; the others load the cache."""
    from clipmoe_vlm.data.decoded_pairs import DEFAULT_MEMORY_LIMIT, DecodedPairs, decoded_bytes

    if decode is None:
        decode = decoded_bytes(dataset) <= DEFAULT_MEMORY_LIMIT
    if not decode:
        return dataset
    cache = cache_dir() / "decoded"
    if accelerator.is_main_process:
        decoded = DecodedPairs.from_dataset(dataset, cache)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        decoded = DecodedPairs.from_dataset(dataset, cache, progress=False)
    return decoded


def make_engine(cfg: UpcycleConfig, accelerator, dataset, work_dir: Path, log) -> Engine:
    run = cfg.run
    from clipmoe_vlm.data.decoded_pairs import DecodedPairs

    # decoded pairs are tensors in memory: loader worker processes would only add inter-process copies
    workers = 0 if isinstance(dataset, DecodedPairs) else cfg.inputs.num_workers
    return Engine(accelerator, dataset, work_dir, log, seed=run.seed, num_workers=workers,
                  resume=run.resume, save_every=run.save_every, stop_after_steps=run.stop_after_steps)


def _load_labels(path: Path, n: int) -> np.ndarray:
    remedy = "delete it to cluster again (or start over with --overwrite)"
    try:
        labels = np.load(path)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: cannot read the cached MCL cluster labels ({type(err).__name__}: {err}); "
                         f"{remedy}") from None
    if labels.shape != (n,):
        raise ValueError(f"{path}: cached MCL cluster labels for {labels.shape[0]} pairs, the data has {n}; {remedy}")
    return labels


def _cluster(engine: Engine, model, train_idx: np.ndarray, previous, cfg: UpcycleConfig, stage: int, path: Path):
    """Accumulated MCL labels for all pairs (-1: held out, -2: unreadable), cached at ``path``."""
    acc = engine.acc
    n = len(engine.dataset)
    if path.is_file():
        return _load_labels(path, n)
    image, text, valid, _ = embed_pairs(model, engine.dataset, train_idx.tolist(), cfg.optim.batch_size, acc,
                                        engine.num_workers, desc=f"embed for stage {stage}")
    ok = valid.numpy()
    if acc.is_main_process:
        labels = np.full(n, -1, dtype=np.int64)
        labels[train_idx] = UNREADABLE
        k, seed = cfg.mcl.clusters, cfg.run.seed
        ci = kmeans_labels(image.numpy()[ok], k, seed + stage)
        ct = kmeans_labels(text.numpy()[ok], k, seed + 1000 + stage)
        prev = None if previous is None else previous[train_idx][ok]
        joint = accumulate_labels(prev, ci, ct, k, k)
        joint[joint < 0] = UNREADABLE  # unreadable at an earlier stage
        labels[train_idx[ok]] = joint
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, labels)
        os.replace(tmp, path)
    acc.wait_for_everyone()
    labels = _load_labels(path, n)
    sizes = np.bincount(labels[labels >= 0])
    acc.print(f"[mcl-{stage}] {len(sizes)} clusters; sizes min {sizes.min()} / median {int(np.median(sizes))} / "
              f"max {sizes.max()}; {int((labels == UNREADABLE).sum())} unreadable pairs excluded, "
              f"{n - len(train_idx)} held out for validation")
    return labels


def _held_out(model, dataset, val_idx, engine, batch_size: int, evaluate, desc: str) -> dict:
    """Held-out retrieval of ``model`` on the validation pairs, plus ``evaluate(model)`` (main process) if given."""
    metrics: dict = {}
    if len(val_idx):
        image, text, valid, _ = embed_pairs(model, dataset, val_idx.tolist(), batch_size, engine.acc,
                                            engine.num_workers, desc=desc)
        metrics.update({f"held_out/{k}": v for k, v in paired_recall(image[valid], text[valid]).items()})
    if evaluate is not None and engine.acc.is_main_process:
        metrics.update(evaluate(model))
    return metrics


def _token_sample(dataset, val_idx, limit: int = 64) -> dict | None:
    """Up to ``limit`` readable held-out pairs as one batch (the tokens the expert diversity is measured on)."""
    from clipmoe_vlm.data.image_text import collate_image_text

    batch = collate_image_text([dataset[int(i)] for i in val_idx[:limit]])
    return batch if batch["pixel_values"] is not None else None


def run_upcycling(cfg: UpcycleConfig, accelerator, argv: list[str] | None = None, evaluate=None) -> Path:
    """Runs ``cfg.recipe`` and writes the output folder; returns its path. ``evaluate(model) -> {metric:
    fraction}`` adds metrics to dmu's per-stage diagnostics (the embedded default passes the Shapes world's)."""
    from clipmoe_vlm.data.image_text import ImageTextDataset
    from clipmoe_vlm.processing import clip_image_transform, open_clip_tokenizer

    out = Path(cfg.output)
    work = out / "work"
    acc = accelerator

    # ---- every input is checked before the output folder is touched
    base = _load_base(cfg)
    if isinstance(base, CLIPMoEModel) and cfg.recipe != "dense":
        raise ValueError(f"--base {cfg.base} is already a CLIP-MoE; recipe {cfg.recipe} needs a dense CLIP")
    if cfg.inputs.text_positions is not None:  # as the official DMU's load_from_clip (Long-CLIP)
        try:
            stretch_text_positions(base, cfg.inputs.text_positions)
        except ValueError as err:
            raise ValueError(f"--text-positions {cfg.inputs.text_positions} (--base {cfg.base}): {err}") from None
    base.requires_grad_(False)
    text_positions = base.config.text_config.max_position_embeddings
    context = cfg.inputs.context_length or text_positions
    if context > text_positions:
        raise ValueError(f"--context-length {context} exceeds the base's {text_positions} text positions "
                         "(--text-positions stretches them)")
    dataset = ImageTextDataset(cfg.data, clip_image_transform(base.config.vision_config.image_size),
                               open_clip_tokenizer(context), max_samples=cfg.inputs.max_samples)
    inputs = run_inputs(dataset, acc.num_processes)
    dataset = decode_once(dataset, cfg.inputs.decode_once, acc)
    split = validation_split(len(dataset), cfg.inputs.val_fraction, cfg.run.seed)
    train_idx = np.flatnonzero(split >= 0)
    _require_a_readable_image(dataset, train_idx)
    mode = check_output_folder(cfg, inputs)
    acc.wait_for_everyone()  # every process has read the folder before the main one writes to it

    if acc.is_main_process:
        if mode == "overwrite":
            _clear_run_files(out)
        else:  # the previous comparison table is rewritten by a comparison run, and stale otherwise
            for name in ("comparison.md", "comparison.json"):
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)  # the settings first: a folder with run files always has them
        atomic_write_text(out / "run_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=True))
        work.mkdir(exist_ok=True)
        atomic_write_text(work / INPUTS_FILE, json.dumps(inputs, indent=1))
        if mode in ("new", "overwrite"):
            atomic_write_text(out / "metrics.jsonl", "")
    acc.wait_for_everyone()
    if mode == "reuse":
        acc.print(f"{out} holds a run with the same settings: " + (
            "resuming it (finished stages are kept, an unfinished one continues from its last checkpoint)"
            if cfg.run.resume else "its finished stages are reused, an unfinished one starts again (--resume "
                                   "continues it from its checkpoint)"))
    elif mode == "new" and cfg.run.resume:
        acc.print(f"--resume: {out} holds no run to continue; starting a new one")
    acc.print(dataset.describe())
    acc.print(f"{acc.num_processes} processes ({acc.distributed_type}), global batch "
              f"{cfg.optim.batch_size * acc.num_processes}")
    log = MetricsLog(out / "metrics.jsonl", enabled=acc.is_main_process,
                     tensorboard=out / "tensorboard" if cfg.run.tensorboard else None)
    try:
        return _run_recipe(cfg, acc, dataset, base, split, log, argv, evaluate)
    finally:
        log.close()


def _run_recipe(cfg: UpcycleConfig, acc, dataset, base, split: np.ndarray, log: MetricsLog, argv, evaluate) -> Path:
    """The recipe's stages, the held-out evaluation and the output files (the folder is checked and set up)."""
    out = Path(cfg.output)
    work = out / "work"
    train_idx = np.flatnonzero(split >= 0)
    val_idx = np.flatnonzero(split < 0)

    engine = make_engine(cfg, acc, dataset, work, log)
    summaries = []

    optim, moe_shape = cfg.optim, cfg.moe
    diversity = None
    if cfg.recipe == "dense":
        model, summary = engine.train_stage(copy.deepcopy(base), stage(
            cfg, "dense", optim.dense_trainable, optim.dense_lr, optim.dense_weight_decay, split))
        summaries.append(summary)
    elif cfg.recipe == "clip-up":
        moe = sparse_upcycle(base, moe_shape.num_experts, moe_shape.top_k, moe_shape.moe_layers, **_moe_options(cfg))
        model, summary = engine.train_stage(moe, stage(
            cfg, "clip-up", optim.clipup_trainable, optim.clipup_lr, optim.clipup_weight_decay, split,
            router_losses=True))
        summaries.append(summary)
    else:  # dmu
        labels, current, expert_ffns = None, base, [base.state_dict()]
        diagnostics = {"base": _held_out(base, dataset, val_idx, engine, optim.batch_size, evaluate, "diagnose base")}
        for s in range(1, cfg.mcl_stages() + 1):
            labels = _cluster(engine, current, train_idx, labels, cfg, s, work / f"labels-stage{s}.npy")
            stage_model, summary = engine.train_stage(copy.deepcopy(base), stage(
                cfg, f"mcl-{s}", "mcl", optim.mcl_lr, optim.mcl_weight_decay, labels, leftover=cfg.mcl.mcl_leftover))
            summaries.append(summary)
            diagnostics[f"mcl-{s}"] = _held_out(stage_model, dataset, val_idx, engine, optim.batch_size, evaluate,
                                                f"diagnose mcl-{s}")
            expert_ffns.append({k: v for k, v in stage_model.state_dict().items() if _MLP.search(k)})
            current = stage_model
        torch.manual_seed(cfg.run.seed)  # the routers' initialisation
        sources = [expert_ffns[0]] + [{**expert_ffns[0], **ffn} for ffn in expert_ffns[1:]]
        moe = sparse_upcycle(base, moe_shape.num_experts, moe_shape.top_k, moe_shape.moe_layers,
                             expert_sources=sources, **_moe_options(cfg))
        tokens = _token_sample(dataset, val_idx) if acc.is_main_process else None
        if tokens is not None:
            diversity = expert_diversity(moe, tokens["pixel_values"], tokens["input_ids"])
        model, summary = engine.train_stage(moe, stage(
            cfg, "router", "router", optim.router_lr, optim.router_weight_decay, split, router_losses=True))
        summaries.append(summary)

    # ---- evaluation on the held-out pairs, model card
    metrics = {}
    stage_report = {"stage_diagnostics": diagnostics, "expert_diversity": diversity} if cfg.recipe == "dmu" else {}
    if len(val_idx):
        for name, m in (("base", base), ("result", model)):
            is_moe = isinstance(m, CLIPMoEModel)
            image, text, valid, load = embed_pairs(m, dataset, val_idx.tolist(), optim.batch_size, acc,
                                                   engine.num_workers, output_router_logits=is_moe,
                                                   desc=f"eval {name}")
            metrics[name] = paired_recall(image[valid], text[valid])
            if load:
                metrics["expert_load"] = {k: [[round(float(x), 4) for x in row] for row in v] for k, v in load.items()}
    skipped_keys = engine.skipped_keys
    if acc.num_processes > 1:  # each process met the unreadable files of its own share of the batches
        from accelerate.utils import gather_object

        skipped_keys = set().union(*gather_object([sorted(skipped_keys)]))
    skipped = len(skipped_keys)
    if acc.is_main_process:
        model.config.upcycling_info = {"recipe": cfg.recipe, "base": cfg.base, "data": list(cfg.data),
                                       "seed": cfg.run.seed,
                                       "text_positions": base.config.text_config.max_position_embeddings} \
            if isinstance(model, CLIPMoEModel) else None
        _save_model(model, out)
        report = {"recipe": cfg.recipe, "stages": summaries, "validation": metrics, "skipped_images": skipped,
                  "skipped_examples": [list(map(str, s)) for s in engine.skipped_examples],
                  "pairs": len(dataset), "validation_pairs": int(len(val_idx)), **stage_report}
        atomic_write_text(out / "summary.json", json.dumps(report, indent=1, default=str))
        atomic_write_text(out / "README.md", model_card(cfg, report, dataset.describe(), argv))
    acc.wait_for_everyone()
    acc.print(f"skipped {skipped} unreadable images" + (f" (first: {engine.skipped_examples[0]})"
                                                        if engine.skipped_examples else ""))
    if "expert_load" in metrics:
        for tower, rows in metrics["expert_load"].items():
            for i, row in enumerate(rows):
                acc.print(f"expert usage {tower} MoE layer {i}: " + " ".join(f"{x:.2f}" for x in row))
    acc.print(f"validation: {json.dumps(metrics.get('base', {}))} (base) -> {json.dumps(metrics.get('result', {}))}")
    if stage_report:
        acc.print("\n" + diagnostics_text(stage_report))
    acc.print(f"wrote {out}")
    return out


def _load_base(cfg: UpcycleConfig):
    """The ``--base`` model; a damaged weights file is an error naming the base, not a bare SafetensorError."""
    from safetensors import SafetensorError

    try:
        return load_clip(cfg.base, seed=cfg.run.seed)
    except (ValueError, FileNotFoundError):
        raise
    except (SafetensorError, OSError, RuntimeError, EOFError) as err:
        raise ValueError(f"--base {cfg.base}: cannot load it ({type(err).__name__}: {err}); is a weights file "
                         "truncated or damaged?") from None


def _require_a_readable_image(dataset, train_idx: np.ndarray) -> None:
    """Fails before training when no training pair has a readable image (reads until the first that loads):
    the run would otherwise save the untrained base and report the pairs as used."""
    first_error = None
    for i in train_idx:
        item = dataset[int(i)]
        if item["pixel_values"] is not None:
            return
        first_error = first_error or item["error"]
    raise ValueError(f"--data: no image of the {len(train_idx)} training pairs can be read (first: {first_error}); "
                     "nothing to train on" if len(train_idx) else
                     "--data: no training pairs (all are held out by --val-fraction)")


def run_inputs(dataset, processes: int) -> dict:
    """What a run's result depends on beyond its settings: the number of pairs and a hash of their captions (a
    data file edited in place under the same ``--data`` path is not the data of the finished run; images
    replaced under the same names are not noticed: hashing them would mean reading every image first), and the
    number of processes (``--batch-size`` is per process: the global batch, and so the steps, follow it)."""
    digest = hashlib.sha256()
    for caption in dataset.captions:
        digest.update(caption.encode("utf-8", "surrogatepass") + b"\0")
    return {"pairs": len(dataset), "captions_sha256": digest.hexdigest(), "processes": processes}


def _input_differences(out: Path, inputs: dict | None, data_settings_changed: bool) -> list[str]:
    path = out / "work" / INPUTS_FILE
    if inputs is None or not path.is_file():  # runs from before the inputs were recorded: settings only
        return []
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return [f"the data and processes (cannot read {path})"]
    diffs = []
    # when --data or --max-samples changed, the data's own difference follows from them (named already)
    if not data_settings_changed and saved.get("pairs") != inputs["pairs"]:
        diffs.append(f"the data ({path}): {saved.get('pairs')} pairs -> {inputs['pairs']} pairs")
    elif not data_settings_changed and saved.get("captions_sha256") != inputs["captions_sha256"]:
        diffs.append(f"the data ({path}): the captions of the {inputs['pairs']} pairs changed (sha256 "
                     f"{str(saved.get('captions_sha256'))[:12]} -> {inputs['captions_sha256'][:12]})")
    if saved.get("processes", inputs["processes"]) != inputs["processes"]:
        diffs.append(f"the number of processes ({path}): {saved['processes']} -> {inputs['processes']} (--batch-size "
                     "is per process: the global batch and the steps follow it)")
    return diffs


def check_output_folder(cfg: UpcycleConfig, inputs: dict | None = None) -> str:
    """What to do with ``cfg.output``: "new" (no run there), "reuse" (a run with the same settings: its finished
    stages are reused, and with --resume its unfinished stage continues) or "overwrite"; anything else raises
    a ValueError naming each setting that differs, and the data or the number of processes when ``inputs``
    (`run_inputs`) differ from the saved run's. Reads only: a refused run leaves the folder as it was."""
    out = Path(cfg.output)
    if cfg.run.overwrite:
        return "overwrite"
    present = [name for name in RUN_FILES[:5] if (out / name).exists()]
    if not present:
        return "new"
    restart = "pass --overwrite to delete its run files and start over, or choose another --output"
    saved_path = out / "run_config.yaml"
    if not saved_path.is_file():
        raise ValueError(f"{out} holds run files ({', '.join(present)}) but no run_config.yaml, so the settings they "
                         f"were made with are unknown and the folder cannot be continued or reused: {restart}")
    saved = read_saved_settings(saved_path, restart)
    now = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))  # as saved: compared like for like
    diffs = changed_settings(saved, now, NEUTRAL_SETTINGS)
    diffs += _input_differences(out, inputs, any(diff.startswith(("--data ", "--max-samples ")) for diff in diffs))
    refuse_changed_settings(out, saved_path, diffs, resume=cfg.run.resume, output_flag="--output")
    return "reuse"


def _clear_run_files(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in out.glob("*.tmp"):  # leftovers of a killed write
        path.unlink() if path.is_file() else shutil.rmtree(path)


def _save_model(model, out: Path) -> None:
    """``save_pretrained`` into a temporary folder, then each file renamed into ``out`` (weights before config)."""
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    written = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
    for stale in out.glob("model*.safetensors*"):  # weights of an earlier save sharded otherwise
        if not (tmp / stale.name).exists():
            stale.unlink()
    for path in written:
        os.replace(path, out / path.name)
    tmp.rmdir()


def diagnostics_text(report: dict) -> str:
    """dmu's per-stage table and the experts' output similarity per MoE layer (for the log and the card)."""
    text = ("What each MCL stage changed (percent ± binomial s.e.; held_out: the run's validation pairs):\n\n"
            + stage_table(report["stage_diagnostics"]))
    diversity = report.get("expert_diversity")
    if diversity:
        text += "\nExpert diversity of the assembled MoE (mean pairwise cosine of expert outputs on held-out tokens; " \
                "1.00 = identical experts), per MoE layer:\n\n"
        for tower, values in diversity.items():
            text += f"- {tower}: " + " ".join(f"{c:.2f}" for c in values["output_cosine"]) + "\n"
    return text


def model_card(cfg: UpcycleConfig, report: dict, data_description: str, argv) -> str:
    lines = [f"# CLIP-MoE: recipe `{cfg.recipe}`", ""]
    if cfg.recipe != "dense":
        lines += [f"{cfg.moe.num_experts} experts, top-{cfg.moe.top_k}, MoE layers: {cfg.moe.moe_layers}; "
                  f"base `{cfg.base}`.", ""]
    else:
        lines += [f"Dense baseline: continued contrastive training of `{cfg.base}`.", ""]
    if cfg.inputs.text_positions is not None:
        lines += [(f"Text positions: {cfg.inputs.text_positions} (`--text-positions`; a base with fewer is "
                   "stretched as Long-CLIP: the first 20 kept, the rest interpolated)."), ""]
    command = "python scripts/upcycle_encoder.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["## How it was made", "", f"```\n{command.strip()}\n```", "", "Data:", "", "```",
              data_description, "```", "", f"Pairs: {report['pairs']} ({report['validation_pairs']} held out for "
              f"validation). Unreadable images skipped: {report['skipped_images']}.", "",
              "| stage | steps | final loss | batches |", "| --- | --- | --- | --- |"]
    for s in report["stages"]:
        final = s.get("final", {}).get("loss", float("nan"))
        lines.append(f"| {s['stage']} | {s['steps']} | {final:.4f} | {s['batches']} |")
    val = report["validation"]
    if val:
        lines += ["", "## Held-out retrieval (measured at the end of the run)", "", "| model | I→T R@1 | T→I R@1 | "
                  "I→T R@5 | T→I R@5 | pairs |", "| --- | --- | --- | --- | --- | --- |"]
        for name in ("base", "result"):
            m = val.get(name, {})
            cells = [m.get(f"{d}_R@{k}", "-") for k in (1, 5) for d in ("i2t", "t2i")]
            lines.append(f"| {name} | " + " | ".join(map(str, cells)) + f" | {m.get('n', '-')} |")
        if "expert_load" in val:
            lines += ["", "## Expert usage (fraction of assignments per expert, per MoE layer)", ""]
            for tower, rows in val["expert_load"].items():
                lines += [f"{tower}:", ""] + [f"- layer {i}: " + ", ".join(f"{x:.2f}" for x in r)
                                             for i, r in enumerate(rows)] + [""]
    if report.get("stage_diagnostics"):
        lines += ["", "## MCL stage diagnostics", "", diagnostics_text(report)]
    lines += ["", "## Loading", "", "```python", "import clipmoe_vlm", "from transformers import AutoModel",
              f"model = AutoModel.from_pretrained({str(Path(cfg.output))!r})", "```", "",
              "Files: `metrics.jsonl` (one line per step), `summary.json`, `run_config.yaml` (the resolved settings), "
              "`work/` (finished stages and checkpoints, reused by `--resume` and by a rerun with the same settings; "
              "safe to delete once the run is done)" + (", `tensorboard/` (the metrics as TensorBoard scalars, one run "
                                                      "per stage)" if cfg.run.tensorboard else "") + ".", ""]
    return "\n".join(lines)
