"""Generate the built-in synthetic Shapes world (CLIP pairs, LLaVA JSON, lmms-eval parquet, encoder eval sets).

Example::

    python scripts/generate_shapes.py --out data/shapes --seed 0

Everything is written under ``--out``, with a ``manifest.json``. A rerun with the same flags is a no-op
(the manifest is the cache key) unless ``--force`` is given. See ``clipmoe_vlm/data/shapes/generate.py`` for
the file layout.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipmoe_vlm.data.shapes import (
    DEFAULT_WORLD_SIZES,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    MMBENCH_ANSWER_STYLES,
    generate_world,
)

_SIZE_HELP = {
    "n_train": "number of CLIP training image-caption pairs",
    "n_pretrain": "number of LLaVA projector-pretraining caption samples",
    "n_instruct": "number of LLaVA instruction samples with an image (about 3%% text-only samples are added)",
    "n_eval": "rows of mmbench_en_dev.parquet and of vizwiz_vqa_val.parquet",
    "n_mmvet": "rows of mmvet.parquet (each needs an LLM judge)",
    "n_retrieval": "images in the COCO-style retrieval set (5 captions each)",
    "n_zeroshot_per_class": "images per class in each zero-shot attribute folder",
    "n_mmvp_pairs": "MMVP-VLM image pairs per attribute",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Write the deterministic synthetic Shapes world: CLIP image-caption pairs, LLaVA pretrain and "
            "instruction JSON, MMBench/VizWiz/MM-Vet parquet files for lmms-eval, and encoder evaluation sets "
            "(COCO-style retrieval, zero-shot class folders, MMVP-VLM pairs)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="output root folder (created if missing)")
    parser.add_argument(
        "--seed", type=int, default=0, help="world seed; equal seeds and flags give byte-identical files"
    )
    for name, default in DEFAULT_WORLD_SIZES.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=default, help=_SIZE_HELP[name])
    parser.add_argument(
        "--image-size",
        type=int,
        default=64,
        help=f"image side in pixels ({MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE})",
    )
    parser.add_argument(
        "--eval-dir",
        type=Path,
        default=None,
        help="folder for the lmms-eval parquet files (default: OUT/eval/data)",
    )
    parser.add_argument(
        "--mmbench-answer",
        choices=MMBENCH_ANSWER_STYLES,
        default="text",
        help="answer of the MMBench-format instruction turns: the option's text ('red', default; MMBench's matcher "
        "maps it to the letter), 'text-letter' ('red (B)') or 'letter' ('B', LLaVA-1.5's format)",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if OUT/manifest.json matches these flags")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``), generate the world, print its counts; return the manifest."""
    args = build_parser().parse_args(argv)
    manifest = generate_world(
        args.out,
        seed=args.seed,
        **{name: getattr(args, name) for name in DEFAULT_WORLD_SIZES},
        image_size=args.image_size,
        eval_dir=args.eval_dir,
        mmbench_answer=args.mmbench_answer,
        force=args.force,
        progress=not args.no_progress,
    )
    print(json.dumps({"root": str(args.out), "counts": manifest["counts"]}, indent=2))
    return manifest

