"""Generate the built-in synthetic Shapes world (CLIP pairs, LLaVA JSON, lmms-eval parquet, encoder eval sets).

Example::

    python scripts/generate_shapes.py --out data/shapes --seed 0

Everything is written under ``--out``, with a ``manifest.json``. A rerun with the same flags is a no-op
(the manifest is the cache key) unless ``--force`` is given. See ``clipmoe_vlm/data/shapes.py`` for the
file layout.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipmoe_vlm.data.shapes import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, MMBENCH_ANSWER_STYLES, generate_world


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
    parser.add_argument("--n-train", type=int, default=4000, help="number of CLIP training image-caption pairs")
    parser.add_argument(
        "--n-pretrain", type=int, default=2000, help="number of LLaVA projector-pretraining caption samples"
    )
    parser.add_argument(
        "--n-instruct",
        type=int,
        default=2000,
        help="number of LLaVA instruction samples with an image (about 3%% text-only samples are added)",
    )
    parser.add_argument(
        "--n-eval", type=int, default=300, help="rows of mmbench_en_dev.parquet and of vizwiz_vqa_val.parquet"
    )
    parser.add_argument("--n-mmvet", type=int, default=100, help="rows of mmvet.parquet (each needs an LLM judge)")
    parser.add_argument(
        "--n-retrieval", type=int, default=300, help="images in the COCO-style retrieval set (5 captions each)"
    )
    parser.add_argument(
        "--n-zeroshot-per-class", type=int, default=20, help="images per class in each zero-shot attribute folder"
    )
    parser.add_argument("--n-mmvp-pairs", type=int, default=15, help="MMVP-VLM image pairs per attribute")
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
        n_train=args.n_train,
        n_pretrain=args.n_pretrain,
        n_instruct=args.n_instruct,
        n_eval=args.n_eval,
        n_mmvet=args.n_mmvet,
        n_retrieval=args.n_retrieval,
        n_zeroshot_per_class=args.n_zeroshot_per_class,
        n_mmvp_pairs=args.n_mmvp_pairs,
        image_size=args.image_size,
        eval_dir=args.eval_dir,
        mmbench_answer=args.mmbench_answer,
        force=args.force,
        progress=not args.no_progress,
    )
    print(json.dumps({"root": str(args.out), "counts": manifest["counts"]}, indent=2))
    return manifest


if __name__ == "__main__":
    main()
