"""Evaluate a dense CLIP or a CLIP-MoE as an encoder: retrieval, zero-shot classification, MMVP-VLM pairs.

    python scripts/eval_encoder.py                                   # runs/clip-moe on the Shapes world
    python scripts/eval_encoder.py --model runs/clip-moe --shapes .cache/clipmoe-vlm/shapes-seed0
    python scripts/eval_encoder.py --model openai/clip-vit-base-patch32 \\
        --coco-captions annotations/captions_val2017.json --coco-images val2017 \\
        --flickr-karpathy dataset_flickr30k.json --flickr-images flickr30k-images \\
        --zeroshot imagenet=imagenet/val --mmvp MMVP_VLM --bf16 --output metrics.json
    python scripts/eval_encoder.py --help                            # every flag

Prints a table (percentages) and writes ``--output`` as JSON: ``{"model", "metrics": {"task/metric": fraction},
"details": {task: {...}}}``. The library behind it is `clipmoe_vlm.evaluation.encoder`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def _named_dir(value: str) -> tuple[str, Path]:
    name, sep, folder = value.partition("=")
    if not sep:
        return Path(value).name or value, Path(value)
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"expected DIR or NAME=DIR, got {value!r}")
    return name, Path(folder)


def build_parser() -> argparse.ArgumentParser:
    from clipmoe_vlm.defaults import DEFAULT_CLIPMOE

    parser = argparse.ArgumentParser(
        description="Encoder evaluation of a CLIP or CLIP-MoE: COCO / Flickr30k retrieval (Recall@1/5/10 both "
                    "ways), zero-shot classification on class folders, MMVP-VLM pair accuracy. With no task flag, "
                    "evaluates the default Shapes world (generated on first use).")
    parser.add_argument("--model", default=str(DEFAULT_CLIPMOE),
                        help="the model: a transformers CLIP or CLIP-MoE folder, a hub id, "
                             "open_clip:ARCH[:TAG_OR_FILE], or an OpenAI-layout .pt (dense CLIP or the official "
                             "CLIP-MoE release) (default: %(default)s)")
    parser.add_argument("--coco-captions", type=Path,
                        help="COCO captions JSON (e.g. captions_val2017.json) or a folder holding captions.json; the "
                             "first 5 captions of each image are used")
    parser.add_argument("--coco-images", type=Path,
                        help="folder of the COCO images (default: images/ next to the captions JSON, else its folder)")
    parser.add_argument("--flickr-karpathy", type=Path,
                        help="Karpathy split JSON (dataset_flickr30k.json): the 1K test split, 5 captions per image")
    parser.add_argument("--flickr-images", type=Path, help="folder of the Flickr30k images")
    parser.add_argument("--flickr-full-token", type=Path,
                        help="results_20130124.token: also evaluate the full-set protocol of CLIP-MoE's code (all "
                             "31,783 images; not comparable with 1K-test numbers)")
    parser.add_argument("--zeroshot", type=_named_dir, action="append", default=[], metavar="[NAME=]DIR",
                        help="ImageNet-style class folders DIR/<class>/*.jpg|png (classnames.json and templates.json "
                             "in DIR are used when present; default templates: the 80 OpenAI ones); repeatable")
    parser.add_argument("--mmvp", type=Path,
                        help="MMVP-VLM folder with Questions.csv and 'MLLM_VLM Images/<Type>/<qid>.jpg'")
    parser.add_argument("--shapes", type=Path,
                        help="a Shapes world root (or its encoder_eval/ folder): retrieval, zero-shot per attribute "
                             "and MMVP-VLM in one go; metrics are prefixed 'shapes/'")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images or texts per forward pass (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="image-loading worker processes, 0 loads in the main process (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast")
    parser.add_argument("--experts-implementation", choices=("grouped_mm", "eager", "batched_mm"), default=None,
                        help="experts kernel of a CLIP-MoE model (default: eager without CUDA, grouped_mm with CUDA)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the default Shapes world, used when no task flag is given (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("runs/eval/encoder_metrics.json"),
                        help="where to write the metrics JSON (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _load_model(spec: str):
    from clipmoe_vlm.loading import load_clip

    model = load_clip(spec)
    if not callable(getattr(model, "get_image_features", None)):
        raise SystemExit(f"--model {spec}: {type(model).__name__} is not a two-tower CLIP")
    return model


def _transform_and_tokenizer(model, model_spec: str):
    from clipmoe_vlm.processing import clip_image_transform, open_clip_tokenizer

    vision, text = model.config.vision_config, model.config.text_config
    if text.vocab_size < 49408:
        raise SystemExit(f"--model {model_spec}: its text vocabulary has {text.vocab_size} tokens; this script "
                         "tokenizes with the OpenAI CLIP BPE (49408 tokens)")
    return clip_image_transform(vision.image_size), open_clip_tokenizer(text.max_position_embeddings)


def format_table(metrics: dict[str, float]) -> str:
    """Metrics as a two-column text table, values in percent."""
    width = max((len(k) for k in metrics), default=6)
    lines = [f"{'metric':<{width}}  {'%':>7}", f"{'-' * width}  {'-' * 7}"]
    lines += [f"{k:<{width}}  {100 * v:7.2f}" for k, v in metrics.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from clipmoe_vlm.defaults import DEFAULT_CLIPMOE, ensure_world
    from clipmoe_vlm.evaluation import evaluate_encoder, flatten_metrics, shapes_encoder_tasks

    if (args.flickr_karpathy or args.flickr_full_token) and not args.flickr_images:
        raise SystemExit("--flickr-karpathy / --flickr-full-token need --flickr-images")
    if args.coco_images and not args.coco_captions:
        raise SystemExit("--coco-images needs --coco-captions")
    names = [name for name, _ in args.zeroshot]
    if len(set(names)) != len(names):
        raise SystemExit(f"--zeroshot names must be distinct, got {names} (use NAME=DIR)")
    tasks = {"coco": args.coco_captions, "coco_images": args.coco_images, "flickr": args.flickr_karpathy,
             "flickr_images": args.flickr_images, "flickr_full_token": args.flickr_full_token,
             "zeroshot": dict(args.zeroshot) or None, "mmvp": args.mmvp}
    if args.model == str(DEFAULT_CLIPMOE) and not DEFAULT_CLIPMOE.exists():
        raise SystemExit(f"--model {DEFAULT_CLIPMOE} (the default) does not exist yet: create it with "
                         "python scripts/upcycle_encoder.py, or pass --model")
    shapes = args.shapes
    any_task = any(tasks[k] is not None for k in ("coco", "flickr", "flickr_full_token", "zeroshot", "mmvp"))
    if shapes is None and not any_task:
        shapes = ensure_world(args.seed)
    shapes_tasks = shapes_encoder_tasks(shapes) if shapes is not None else None  # layout errors before loading

    model = _load_model(args.model)
    if args.experts_implementation is not None:
        from clipmoe_vlm import CLIPMoEModel

        if not isinstance(model, CLIPMoEModel):
            raise SystemExit(f"--experts-implementation: --model {args.model} is not a CLIP-MoE")
        model.set_experts_implementation(args.experts_implementation)
    transform, tokenizer = _transform_and_tokenizer(model, args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    common = {"batch_size": args.batch_size, "device": device, "bf16": args.bf16, "num_workers": args.num_workers,
              "progress": not args.no_progress}
    details: dict[str, dict] = {}
    if shapes_tasks is not None:
        shapes_results = evaluate_encoder(model, transform, tokenizer, **shapes_tasks, **common)
        details.update({f"shapes/{'retrieval' if k == 'coco' else k}": v for k, v in shapes_results.items()})
    details.update(evaluate_encoder(model, transform, tokenizer, **tasks, **common))
    metrics = flatten_metrics(details)
    print(format_table(metrics))
    report = {"model": args.model, "device": str(device), "bf16": args.bf16, "metrics": metrics, "details": details}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
