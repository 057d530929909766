"""The embedded default: the Shapes world, a tiny dense base trained from scratch, and the recipe comparison.

``python scripts/upcycle_encoder.py`` with no ``--data`` generates the Shapes world once (cached), trains a tiny
dense CLIP from scratch on its pairs once (cached; it stands in for a pretrained base), runs the ``dmu`` recipe
into ``--output``, and, with ``compare`` on (the default here), the ``dense`` (same number of steps) and
``clip-up`` recipes next to it, then evaluates the four encoders on the world's held-out encoder sets and prints
one table (also written as ``comparison.md`` and ``comparison.json`` in the output folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from clipmoe_vlm.defaults import base_dir, ensure_world
from clipmoe_vlm.files import atomic_write_text
from clipmoe_vlm.loading import tiny_clip_config

from .config import UpcycleConfig
from .engine import embed_pairs, paired_recall
from .recipes import decode_once, make_engine, run_upcycling, stage, validation_split

__all__ = ["PLATEAU_POINTS", "RECIPE_RATES", "convergence_text", "evaluate_on_world", "pretrain_shapes_base",
           "resolve_defaults", "run_comparison"]


def resolve_defaults(cfg: UpcycleConfig, accelerator) -> UpcycleConfig:
    """Fills in the Shapes world as data and the cached tiny base as ``--base shapes-tiny``."""
    changes = {}
    world = None
    if not cfg.data:
        seed, scale = cfg.run.seed, cfg.shapes.shapes_scale
        if accelerator.is_main_process:
            world = ensure_world(seed, scale)
        accelerator.wait_for_everyone()
        world = ensure_world(seed, scale) if world is None else world
        changes["data"] = [str(world / "clip_train" / "captions.jsonl")]
        if cfg.shapes.compare is None:
            changes["shapes"] = dataclasses.replace(cfg.shapes, compare=True)
    if cfg.base == "shapes-tiny":
        data = changes.get("data", cfg.data)
        changes["base"] = str(pretrain_shapes_base(dataclasses.replace(cfg, data=data), accelerator))
    return dataclasses.replace(cfg, **changes)


# The base stands in for a pretrained CLIP, so it is trained until more training stops paying: held-out
# retrieval (mean of I->T and T->I R@1 on the validation pairs) is probed along training, and the criterion is a
# gain below this many points over the last quarter of the epochs.
PLATEAU_POINTS = 1.0
# With 50 warm-up steps the tiny CLIP can sit at the chance loss (ln 64) for hundreds of steps, depending on the
# data order (seed 0, 2,000 pairs: loss 4.1 at step 200, against 1.05 with 200 warm-up steps).
BASE_WARMUP_STEPS = 200


def _mean_recall(probe: dict) -> tuple[float, float | None]:
    """Mean of I->T and T->I R@1 of a probe, and its standard error (the two directions taken as independent)."""
    errors = [probe.get(f"{d}_R@1/se") for d in ("i2t", "t2i")]
    se = (errors[0] ** 2 + errors[1] ** 2) ** 0.5 / 2 if None not in errors else None
    return (probe["i2t_R@1"] + probe["t2i_R@1"]) / 2, se


def _plateau(curve: list[dict], epochs: int) -> dict:
    """The convergence evidence of a probed curve: the gain over the last quarter of training, with the standard
    error of that difference (the probes are finite samples of validation pairs)."""
    probes = [(c["epoch"], *_mean_recall(c)) for c in curve if "i2t_R@1" in c]
    if len(probes) < 2:
        return {"criterion": f"gain < {PLATEAU_POINTS:g} points over the last quarter", "reached": None}
    start = epochs - epochs // 4
    before = max(p for p in probes if p[0] <= start)
    last = probes[-1]
    gain = (last[1] - before[1]) * 100
    record = {"criterion": f"mean held-out R@1 gains < {PLATEAU_POINTS:g} points over the last quarter of training "
                           f"(epoch {before[0]} -> {last[0]})", "last_quarter_gain_points": round(gain, 2),
              "reached": gain < PLATEAU_POINTS}
    if before[2] is not None and last[2] is not None:
        record["last_quarter_gain_se_points"] = round(100 * (before[2] ** 2 + last[2] ** 2) ** 0.5, 2)
    return record


def convergence_text(record: dict) -> str:
    """The base's curve and verdict, for the log, the base's card and the run's printout."""
    curve = " ".join(f"e{c['epoch']}:{(c['i2t_R@1'] + c['t2i_R@1']) * 50:.1f}" for c in record["curve"])
    verdict = record["plateau"]
    state = {True: "plateau reached", False: "NOT at its plateau", None: "too few probes to judge"}[verdict["reached"]]
    gain, se = verdict.get("last_quarter_gain_points"), verdict.get("last_quarter_gain_se_points")
    noise = f" ± {se:.2f} (one s.e. of the probes)" if se is not None else ""
    if se is not None and se > PLATEAU_POINTS:  # a 120-epoch base beat this "flat" 80-epoch one by 4 MMVP points
        state += f", but the probes cannot resolve {PLATEAU_POINTS:g} point"
    return (f"tiny dense base convergence ({state}): mean held-out R@1 by epoch {curve}; "
            + (f"last-quarter gain {gain:+.2f}{noise} points; " if gain is not None else "") + f"criterion: "
            f"{verdict['criterion']}")


def pretrain_shapes_base(cfg: UpcycleConfig, accelerator) -> Path:
    """Trains (once) a tiny dense CLIP from scratch on ``cfg.data``: all weights and the temperature learn.
    Held-out retrieval is probed along training; the curve and the plateau verdict are kept beside the model
    (``convergence.json``, the card) and printed. The folder name carries the settings, so a change retrains."""
    from transformers import CLIPModel

    from clipmoe_vlm.data.image_text import ImageTextDataset
    from clipmoe_vlm.processing import clip_image_transform, open_clip_tokenizer

    seed, shapes = cfg.run.seed, cfg.shapes
    scale = "" if shapes.shapes_scale == 1.0 else f"-x{shapes.shapes_scale:g}"
    pairs = "" if cfg.inputs.max_samples is None else f"-n{cfg.inputs.max_samples}"
    # the held-out split is part of the name: a base must never have trained on the recipes' validation pairs
    out = Path(f"{base_dir(seed)}{scale}{pairs}-val{cfg.inputs.val_fraction:g}-e{shapes.base_epochs}"
               f"-lr{shapes.base_lr:g}")
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        accelerator.print(f"tiny dense base: cached at {out}")
        if (out / "convergence.json").is_file():
            accelerator.print(convergence_text(json.loads((out / "convergence.json").read_text())))
        return out
    accelerator.print(f"tiny dense base: training from scratch on the Shapes world ({shapes.base_epochs} epochs) "
                      f"-> {out}")
    torch.manual_seed(seed)
    config = tiny_clip_config()
    model = CLIPModel(config)
    dataset = ImageTextDataset(cfg.data, clip_image_transform(config.vision_config.image_size),
                               open_clip_tokenizer(config.text_config.max_position_embeddings),
                               max_samples=cfg.inputs.max_samples)  # the recipes see the same pairs
    dataset = decode_once(dataset, cfg.inputs.decode_once, accelerator)
    labels = validation_split(len(dataset), cfg.inputs.val_fraction, seed)  # the pairs the recipes hold out
    val_idx = [int(i) for i in (labels < 0).nonzero()[0]]
    engine = make_engine(cfg, accelerator, dataset, out / "work", lambda record: None)
    every = max(1, shapes.base_epochs // 12)

    def probe(epoch: int, current) -> dict | None:
        if val_idx and (epoch % every == 0 or epoch == shapes.base_epochs):
            image, text, valid, _ = embed_pairs(current, dataset, val_idx, 256, accelerator, engine.num_workers,
                                                desc=f"probe epoch {epoch}")
            return paired_recall(image[valid], text[valid])
        return None

    model, summary = engine.train_stage(model, stage(
        cfg, "scratch", "all", shapes.base_lr, 0.1, labels, epochs=shapes.base_epochs, batch_size=64,
        learn_temperature=True, label_smoothing=0.0, warmup_steps=BASE_WARMUP_STEPS, temperature=None),
        on_epoch_end=probe)
    record = {"curve": summary["epoch_metrics"], "plateau": _plateau(summary["epoch_metrics"], shapes.base_epochs),
              "epochs": shapes.base_epochs, "lr": shapes.base_lr, "batch_size": 64, "steps": summary["steps"]}
    if accelerator.is_main_process:  # built beside the cache and renamed: a killed build is never "cached"
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        (partial / "convergence.json").write_text(json.dumps(record, indent=1))
        (partial / "README.md").write_text(
            "# Tiny dense CLIP trained from scratch on the Shapes world\n\n"
            f"Stands in for a pretrained base in the embedded default run. {summary['steps']} steps, batch 64, "
            f"lr {shapes.base_lr}, learned temperature; final loss {summary['final'].get('loss', float('nan')):.4f}."
            f"\n\n{convergence_text(record)}\n")
        if out.exists():  # only the build's checkpoints (work/) can be there
            shutil.rmtree(out)
        os.replace(partial, out)
    accelerator.print(convergence_text(record))
    accelerator.wait_for_everyone()
    return out


def _evaluate(path: Path, world: Path, batch_size: int) -> dict:
    from transformers import AutoModel

    return evaluate_on_world(AutoModel.from_pretrained(path).eval(), world, batch_size)


def evaluate_on_world(model, world: Path, batch_size: int = 128) -> dict:
    """The comparison table's metrics of ``model`` on the world's held-out encoder sets, with standard errors."""
    from clipmoe_vlm.evaluation import evaluate_shapes_encoder
    from clipmoe_vlm.processing import clip_image_transform, open_clip_tokenizer

    transform = clip_image_transform(model.config.vision_config.image_size)
    tokenizer = open_clip_tokenizer(model.config.text_config.max_position_embeddings)
    was_training = model.training
    model.eval()
    try:
        metrics = evaluate_shapes_encoder(model, transform, tokenizer, world, batch_size=batch_size, progress=False,
                                          with_standard_errors=True)
    finally:
        model.train(was_training)
    return {k: v for k, v in metrics.items() if _HEADLINE(k.removesuffix("/se"))}


def _HEADLINE(key: str) -> bool:
    """The metrics of the comparison table: R@1 both ways, zero-shot top-1 per attribute, MMVP per type."""
    return key.endswith("R@1") or key.endswith("/top1") or key.startswith("mmvp/")


# The learning rates a recipe trains with; --lr-sweep scales all of a recipe's rates by the same factor.
RECIPE_RATES = {"dmu": ("mcl_lr", "router_lr"), "dense": ("dense_lr",), "clip-up": ("clipup_lr",)}


def _held_out_retrieval(run: Path) -> float:
    """Mean I->T / T->I R@1 of a finished run on its validation pairs (never on the evaluation sets)."""
    result = json.loads((run / "summary.json").read_text())["validation"]["result"]
    return (result["i2t_R@1"] + result["t2i_R@1"]) / 2


def run_comparison(cfg: UpcycleConfig, accelerator, argv) -> Path:
    """dmu into ``cfg.output``, dense and clip-up beside it, then one evaluation table.

    Every recipe gets the same number of steps. With ``--lr-sweep``, every recipe is also trained with its
    learning rates scaled by each factor (``{output}-{recipe}-x{factor}``), and each recipe's run with the best
    retrieval on the held-out validation pairs enters the table.
    """
    out = Path(cfg.output)
    factors = list(dict.fromkeys(cfg.shapes.lr_sweep or [1.0]))
    if 1.0 not in factors:
        raise ValueError(f"--lr-sweep {' '.join(f'{f:g}' for f in factors)}: include 1, the preset's own rates")
    steps_epochs = cfg.mcl_stages() + 1  # dmu: one epoch per MCL stage plus one of router tuning
    world = Path(cfg.data[0]).parents[1]
    sweep: dict[str, dict[float, Path]] = {}
    for recipe in ("dmu", "dense", "clip-up"):
        optim = cfg.optim if recipe == "dmu" else dataclasses.replace(cfg.optim, epochs=cfg.optim.epochs * steps_epochs)
        for factor in factors:
            name = out.name if recipe == "dmu" else f"{out.name}-{recipe}"
            target = out.parent / (name if factor == 1.0 else f"{out.name}-{recipe}-x{factor:g}")
            rates = {field: getattr(optim, field) * factor for field in RECIPE_RATES[recipe]}
            # dmu at the preset rates also reports what each MCL stage changed on the world's sets
            evaluate = (lambda model: evaluate_on_world(model, world)) if recipe == "dmu" and factor == 1.0 else None
            run_upcycling(dataclasses.replace(cfg, recipe=recipe, output=str(target),
                                              optim=dataclasses.replace(optim, **rates)),
                          accelerator, argv, evaluate=evaluate)
            sweep.setdefault(recipe, {})[factor] = target
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return out
    scores = {recipe: {f: _held_out_retrieval(path) for f, path in runs.items()} for recipe, runs in sweep.items()}
    chosen = {recipe: max(s, key=lambda f: (s[f], f == 1.0)) for recipe, s in scores.items()}
    summary = json.loads((out / "summary.json").read_text())
    # dmu's stage diagnostics already evaluated the base on the world (the same function and sets)
    base_row = {k: v for k, v in summary.get("stage_diagnostics", {}).get("base", {}).items()
                if not k.startswith("held_out/")}
    rows = {"dense base": base_row or _evaluate(Path(cfg.base), world, 128)}
    for recipe in ("dense", "clip-up", "dmu"):
        rows[recipe] = _evaluate(sweep[recipe][chosen[recipe]], world, 128)
    dmu_summary = json.loads((sweep["dmu"][chosen["dmu"]] / "summary.json").read_text())
    table = comparison_table(rows, dmu_summary.get("validation", {}).get("expert_load"))
    if len(factors) > 1:
        table = sweep_text(cfg, scores, chosen) + "\n" + table
    convergence = Path(cfg.base) / "convergence.json"
    if convergence.is_file():  # the evidence that the base stands in for a converged, pretrained CLIP
        table = convergence_text(json.loads(convergence.read_text())) + "\n\n" + table
    atomic_write_text(out / "comparison.md", table)
    atomic_write_text(out / "comparison.json", json.dumps({
        "runs": {recipe: str(sweep[recipe][chosen[recipe]]) for recipe in sweep}, "metrics": rows,
        "lr_sweep": {recipe: {f"{f:g}": round(v, 4) for f, v in s.items()} for recipe, s in scores.items()},
        "chosen_factor": chosen}, indent=1))
    print("\n" + table)
    accelerator.wait_for_everyone()
    return out


def sweep_text(cfg: UpcycleConfig, scores: dict[str, dict[float, float]], chosen: dict[str, float]) -> str:
    """The learning-rate sweep: held-out validation retrieval of every recipe at every factor."""
    factors = list(next(iter(scores.values())))
    lines = ["| recipe | rates at x1 | " + " | ".join(f"x{f:g}" for f in factors) + " |",
             "| --- | --- |" + " --- |" * len(factors)]
    for recipe, by_factor in scores.items():
        rates = ", ".join(f"{field} {getattr(cfg.optim, field):g}" for field in RECIPE_RATES[recipe])
        cells = [f"**{v * 100:.1f}**" if f == chosen[recipe] else f"{v * 100:.1f}" for f, v in by_factor.items()]
        lines.append(f"| {recipe} | {rates} | " + " | ".join(cells) + " |")
    return ("Learning-rate sweep (mean held-out validation R@1, percent; bold: the run compared below):\n\n"
            + "\n".join(lines) + "\n")


def comparison_table(rows: dict[str, dict], expert_load: dict | None = None) -> str:
    """Percent per metric and model, with the binomial standard error of each figure (``± se``)."""
    keys = []
    for metrics in rows.values():
        keys += [k for k in metrics if k not in keys and not k.endswith("/se") and isinstance(metrics[k], (int, float))]
    lines = ["| metric | " + " | ".join(rows) + " |", "| --- |" + " --- |" * len(rows)]
    for key in keys:
        cells = []
        for name in rows:
            value, se = rows[name].get(key), rows[name].get(f"{key}/se")
            cell = f"{value * 100:.1f}" if isinstance(value, float) else str(value)
            cells.append(cell + (f" ± {se * 100:.1f}" if isinstance(se, float) else ""))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    text = ("Encoder metrics on the Shapes world's held-out sets (percent ± one binomial standard error):\n\n"
            + "\n".join(lines) + "\n")
    if expert_load:
        text += "\nExpert usage of the dmu model (fraction of assignments per expert, per MoE layer):\n\n"
        for tower, layers in expert_load.items():
            for i, row in enumerate(layers):
                text += f"- {tower} layer {i}: " + " ".join(f"{x:.2f}" for x in row) + "\n"
    return text
