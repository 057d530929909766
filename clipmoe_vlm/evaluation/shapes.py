"""Encoder evaluation on the built-in Shapes world (`clipmoe_vlm.data.shapes`), with standard errors.

The world's ``encoder_eval/`` folder holds a COCO-format retrieval set, one ImageNet-style zero-shot tree per
attribute and an MMVP-VLM folder; `evaluate_shapes_encoder` runs all three through `evaluate_encoder`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .encoder import PathLike, Tokenizer, Transform, _require_dir, evaluate_encoder, flatten_metrics

__all__ = ["evaluate_shapes_encoder", "shapes_encoder_tasks", "standard_errors"]


def standard_errors(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Binomial standard errors ``sqrt(p (1 - p) / n)`` of the flat metrics of `evaluate_encoder` results, where
    ``n`` is the number of independent trials behind each fraction: images (I->T) or texts (T->I) for retrieval,
    images for zero-shot top-k, pairs of the type for MMVP; MMVP's average over types combines the types'
    variances. Metrics without a count (e.g. ``mean_per_class``) get none."""
    out: dict[str, float] = {}

    def se(p: float, n: int) -> float:
        return math.sqrt(max(p * (1 - p), 0.0) / n) if n else math.nan

    for task, metrics in results.items():
        if "num_texts" in metrics:
            for name, value in metrics.items():
                if isinstance(value, float) and "_R@" in name:
                    out[f"{task}/{name}"] = se(value, metrics["num_images" if name.startswith("i2t") else "num_texts"])
        elif "num_classes" in metrics:
            for name in ("top1", "top5"):
                if name in metrics:
                    out[f"{task}/{name}"] = se(metrics[name], metrics["num_images"])
        elif "pairs_per_type" in metrics:
            counts = metrics["pairs_per_type"]
            for kind, n in counts.items():
                out[f"{task}/{kind}"] = se(metrics[kind], n)
            out[f"{task}/average"] = math.sqrt(sum(out[f"{task}/{k}"] ** 2 for k in counts)) / len(counts)
    return out


def _encoder_eval_dir(root: PathLike) -> Path:
    root = Path(root)
    folder = root / "encoder_eval" if (root / "encoder_eval").is_dir() else root
    if not (folder / "retrieval").is_dir() and not (folder / "zeroshot").is_dir():
        raise FileNotFoundError(f"expected {root / 'encoder_eval'}/ (a Shapes world's encoder evaluation folder "
                                "with retrieval/, zeroshot/ and mmvp_vlm/; see clipmoe_vlm.data.shapes)")
    return folder


def shapes_encoder_tasks(root: PathLike) -> dict[str, Any]:
    """The `evaluate_encoder` keyword arguments for a Shapes world (its root or its ``encoder_eval/`` folder):
    ``coco`` = ``retrieval/captions.json``, ``zeroshot`` = one task per attribute folder of ``zeroshot/``,
    ``mmvp`` = ``mmvp_vlm/``. Every expected file is checked here, so a bad layout fails before any encoding."""
    folder = _encoder_eval_dir(root)
    captions = folder / "retrieval" / "captions.json"
    if not captions.is_file():
        raise FileNotFoundError(f"expected {captions} (COCO captions format)")
    zs_root = _require_dir(folder / "zeroshot", "one ImageNet-style class-folder tree per attribute")
    attributes = sorted(p.name for p in zs_root.iterdir() if p.is_dir())
    if not attributes:
        raise FileNotFoundError(f"expected {zs_root}/<attribute>/<class>/*.png; found no attribute folder")
    questions = folder / "mmvp_vlm" / "Questions.csv"
    if not questions.is_file():
        raise FileNotFoundError(f"expected {questions} (MMVP-VLM layout)")
    return {"coco": captions, "coco_images": folder / "retrieval" / "images",
            "zeroshot": {a: zs_root / a for a in attributes}, "mmvp": folder / "mmvp_vlm"}


def evaluate_shapes_encoder(model, transform: Transform, tokenizer: Tokenizer, root: PathLike, *,
                            batch_size: int = 64, device: str | torch.device | None = None, bf16: bool = False,
                            num_workers: int = 0, progress: bool = True,
                            with_standard_errors: bool = False) -> dict[str, float]:
    """Retrieval, zero-shot per attribute and MMVP-VLM on a Shapes world (its root or ``encoder_eval/``), as one
    flat dict of fractions: ``retrieval/{i2t,t2i}_R@{1,5,10}``, ``zeroshot/<attribute>/{top1,mean_per_class}``
    (+ ``top5`` for attributes with more than 5 classes), ``mmvp/<Type>`` and ``mmvp/average``. With
    ``with_standard_errors``, each metric that has one also comes as ``<metric>/se`` (`standard_errors`)."""
    results = evaluate_encoder(model, transform, tokenizer, **shapes_encoder_tasks(root), batch_size=batch_size,
                               device=device, bf16=bf16, num_workers=num_workers, progress=progress)
    results = {("retrieval" if task == "coco" else task): metrics for task, metrics in results.items()}
    flat = flatten_metrics(results)
    if with_standard_errors:
        flat.update({f"{key}/se": value for key, value in standard_errors(results).items()})
    return flat
