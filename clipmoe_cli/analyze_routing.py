"""Plot and summarise how a CLIP-MoE routes image (and caption) tokens to its experts.

    python scripts/analyze_routing.py                                 # runs/clip-moe on the Shapes world
    python scripts/analyze_routing.py --model runs/clip-moe --images DIR_OR_JSONL [--captions JSONL] \\
        --num-images 64 --layers 0 11 23 --output runs/routing
    python scripts/analyze_routing.py --help                          # every flag

Writes into ``--output``: ``expert_usage.png`` (layers x experts heatmap per tower), ``patch_experts.png`` (images
next to their patch grids coloured by top-1 expert), ``routing.json`` and ``summary.txt`` (also printed). The
library behind it is `clipmoe_vlm.evaluation.routing`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def build_parser() -> argparse.ArgumentParser:
    from clipmoe_vlm.defaults import DEFAULT_CLIPMOE

    parser = argparse.ArgumentParser(
        description="Routing analysis of a CLIP-MoE: expert usage per layer and tower, per-patch top-1 expert maps, "
                    "router entropy and how often the top-1 expert changes between layers. With no --images, uses "
                    "the default Shapes world's CLIP training pairs (generated on first use).")
    parser.add_argument("--model", default=str(DEFAULT_CLIPMOE),
                        help="a CLIP-MoE: a folder saved by this toolkit (config.json + safetensors) or the official "
                             "CLIP-MoE .pt release (default: %(default)s)")
    parser.add_argument("--images", type=Path,
                        help="a folder of images (sorted by path, searched recursively) or a JSONL file of "
                             "{\"image\": path, \"caption\": text} lines (paths relative to the file's folder)")
    parser.add_argument("--captions", type=Path,
                        help="JSONL with a \"caption\" per line for the text tower (default: the captions of an "
                             "--images JSONL, if it has them)")
    parser.add_argument("--num-images", type=int, default=64,
                        help="how many images (and captions) to route (default: %(default)s)")
    parser.add_argument("--num-maps", type=int, default=4,
                        help="how many images get per-patch expert maps (default: %(default)s)")
    parser.add_argument("--layers", type=int, nargs="+",
                        help="vision MoE layers (0-based encoder layer indices) to draw in the patch maps "
                             "(default: up to 4, evenly spaced)")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the default Shapes world, used without --images (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("runs/routing"),
                        help="output folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _read_jsonl(path: Path, key: str, required: bool) -> list[str | None]:
    if not path.is_file():
        raise SystemExit(f"{path}: file not found (expected JSONL with a \"{key}\" per line)")
    values = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}:{line_no}: not valid JSON: {err}") from None
        value = record.get(key) if isinstance(record, dict) else None
        if required and not isinstance(value, str):
            raise SystemExit(f"{path}:{line_no}: expected a string \"{key}\"")
        values.append(value if isinstance(value, str) else None)
    return values


def load_inputs(images: Path, captions: Path | None, limit: int) -> tuple[list[Path], list[str] | None]:
    """Image paths (at most ``limit``) and the captions for the text tower (or None)."""
    caption_list: list[str] | None = None
    if images.is_dir():
        paths = sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise SystemExit(f"--images {images}: no .jpg/.png/.webp image in the folder")
    elif images.suffix == ".jsonl":
        paths = [images.parent / p for p in _read_jsonl(images, "image", required=True)]
        if not paths:
            raise SystemExit(f"--images {images}: the file has no lines (expected JSONL with an \"image\" per line)")
        found = _read_jsonl(images, "caption", required=False)
        if all(c is not None for c in found):
            caption_list = found
    else:
        raise SystemExit(f"--images {images}: expected a folder of images or a .jsonl file")
    paths = paths[:limit]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"--images {images}: image {missing[0]} not found")
    if captions is not None:
        caption_list = _read_jsonl(captions, "caption", required=True)
        if not caption_list:
            raise SystemExit(f"--captions {captions}: the file has no lines (expected JSONL with a \"caption\" per "
                             "line)")
    return paths, caption_list[:limit] if caption_list else None


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from PIL import Image

    from clipmoe_vlm import CLIPMoEModel, CLIPMoEVisionModel
    from clipmoe_vlm.defaults import DEFAULT_CLIPMOE, ensure_world
    from clipmoe_vlm.evaluation import analyze_routing
    from clipmoe_vlm.loading import load_clip
    from clipmoe_vlm.processing import clip_image_transform, open_clip_tokenizer

    if args.num_images < 1:
        raise SystemExit(f"--num-images must be >= 1, got {args.num_images}")
    if args.model == str(DEFAULT_CLIPMOE) and not DEFAULT_CLIPMOE.exists():
        raise SystemExit(f"--model {DEFAULT_CLIPMOE} (the default) does not exist yet: create it with "
                         "python scripts/upcycle_encoder.py, or pass --model")
    images_spec = args.images or ensure_world(args.seed) / "clip_train" / "captions.jsonl"
    paths, captions = load_inputs(images_spec, args.captions, args.num_images)
    model = load_clip(str(args.model))
    if not isinstance(model, (CLIPMoEModel, CLIPMoEVisionModel)):
        raise SystemExit(f"--model {args.model}: {type(model).__name__} is not a CLIP-MoE (no routers to analyse)")
    vision = model.config.vision_config if isinstance(model, CLIPMoEModel) else model.config
    if args.layers is not None:
        bad = [i for i in args.layers if not vision.is_moe_layer(i)]
        if bad:
            raise SystemExit(f"--layers {bad}: not MoE layers of the vision tower; MoE layers: "
                             f"{vision.moe_layer_indices()}")
    tokenizer = None
    if captions and isinstance(model, CLIPMoEModel):
        text = model.config.text_config
        if text.vocab_size < 49408:
            raise SystemExit(f"--model {args.model}: text vocabulary of {text.vocab_size} tokens; this script "
                             "tokenizes with the OpenAI CLIP BPE (49408 tokens)")
        tokenizer = open_clip_tokenizer(text.max_position_embeddings)
    else:
        captions = None
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))  # decodes now: a truncated file fails here, named
        except (OSError, Image.DecompressionBombError) as err:
            raise SystemExit(f"--images {images_spec}: image {path} cannot be read: {err}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = analyze_routing(model, images, clip_image_transform(vision.image_size), args.output,
                              captions=captions, tokenizer=tokenizer, layers=args.layers, num_maps=args.num_maps,
                              batch_size=args.batch_size, device=device, bf16=args.bf16,
                              progress=not args.no_progress)
    print(Path(summary["files"]["summary"]).read_text(encoding="utf-8"), end="")
    print(f"wrote {args.output}/: " + ", ".join(Path(p).name for p in summary["files"].values()), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
