"""The whole Shapes world in one call, cached by its manifest.

Files written by :func:`generate_world` under ``root``
------------------------------------------------------
::

    manifest.json                         counts, seed, generator version, parameters, files
    clip_train/                           image-caption pairs for CLIP training
        images/000001.png ...
        captions.jsonl                    {"image": "images/000001.png", "caption": "..."} per line
        captions.csv                      columns image,caption (same rows)
        scenes.jsonl                      {"image", "count", "objects": [...]}: attribute labels for probes
    llava/                                LLaVA-1.5 JSON; image paths are relative to this folder
        images/pretrain/000001.png ...    (use it as --image_folder)
        images/instruct/000001.png ...
        pretrain.json                     caption set: one "<image>\\n<instruction>" turn and the caption
        instruct.json                     2-4 QA turns per image (short answer, long answer, multiple choice)
                                          plus a few text-only samples without an "image" key
    eval/data/                            lmms-eval parquet files (the folder can be chosen: eval_dir)
        mmbench_en_dev.parquet            index,question,hint,A,B,C,D,answer,category,image,source,
                                          L2-category,comment,split
        vizwiz_vqa_val.parquet            question_id,image,question,answers (10 strings),category
        mmvet.parquet                     question_id,image,question,answer (<AND>/<OR>),image_source,capability
    encoder_eval/
        retrieval/images/000001.png ...   COCO-captions style retrieval set
        retrieval/captions.json           {"images": [{"id", "file_name", ...}], "annotations":
                                          [{"id", "image_id", "caption"}]}: 5 captions per image
        retrieval/scenes.jsonl
        zeroshot/<attribute>/<class>/00001.png   ImageNet-style class folders, one tree per attribute
        zeroshot/<attribute>/classnames.json     class names in sorted folder order (ImageFolder's order)
        zeroshot/<attribute>/templates.json      prompt templates with a "{}" slot
        mmvp_vlm/Questions.csv            columns "Question ID","Type","Statement" (MMVP-VLM layout)
        mmvp_vlm/MLLM_VLM Images/<Type>/<qid>.jpg
        mmvp_vlm/pairs.jsonl              sidecar: the two scenes of each pair and the attribute that differs
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .benchmarks import write_mmbench, write_mmvet, write_vizwiz
from .encoder_sets import write_mmvp_vlm, write_retrieval, write_zeroshot
from .questions import _check_mmbench_answer
from .world import (
    DEFAULT_CONFIG,
    GENERATOR_NAME,
    GENERATOR_VERSION,
    ShapesConfig,
    _check_image_size,
    _check_positive,
    _check_seed,
)
from .writers import WriteResult, _write_json, _write_text
from .writers_llava import write_clip_pairs, write_llava_instruct, write_llava_pretrain

#: Item counts of the default world. Defined once because `generate_world`'s keyword defaults, the flags of
#: scripts/generate_shapes.py and `clipmoe_vlm.defaults.WORLD_SIZES` must agree: the counts are part of the
#: manifest's cache key, so any drift regenerates the world.
# The encoder evaluation sets are sized so that one binomial standard error is at most 3 points at any score
# (p = 0.5 needs n >= 278): 400 retrieval images, 150 images per zero-shot class (the two-class attributes
# then have 300), 300 MMVP pairs per attribute. Each set is drawn from its own seeds, so resizing one leaves
# every other file of the world unchanged.
DEFAULT_WORLD_SIZES: Mapping[str, int] = MappingProxyType(
    {"n_train": 4000, "n_pretrain": 2000, "n_instruct": 2000, "n_eval": 300, "n_mmvet": 100,
     "n_retrieval": 400, "n_zeroshot_per_class": 150, "n_mmvp_pairs": 300}
)  # fmt: skip

_MANIFEST = "manifest.json"
_IN_PROGRESS = ".shapes_in_progress.json"
_OWNED_DIRS: tuple[str, ...] = ("clip_train", "llava", "encoder_eval")
_EVAL_FILES: Mapping[str, str] = MappingProxyType(
    {"mmbench_en_dev": "mmbench_en_dev.parquet", "vizwiz_vqa_val": "vizwiz_vqa_val.parquet", "mmvet": "mmvet.parquet"}
)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _resolve(entry: str, root: Path) -> Path:
    path = Path(entry)
    return path if path.is_absolute() else root / path


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _remove_previous_outputs(root: Path) -> None:
    """Delete what an earlier (complete or interrupted) run wrote, as listed by its own records."""
    for record_name in (_MANIFEST, _IN_PROGRESS):
        record = _read_json(root / record_name)
        if record is None or record.get("generator") != GENERATOR_NAME:
            continue
        for entry in record.get("dirs", []):
            path = _resolve(entry, root)
            inside = path.resolve().is_relative_to(root.resolve()) and path.resolve() != root.resolve()
            if path.is_dir() and inside:
                shutil.rmtree(path)
        for entry in record.get("files", {}).values():
            path = _resolve(entry, root)
            if path.is_file():
                path.unlink()
        (root / record_name).unlink(missing_ok=True)


def _manifest_is_current(manifest: Mapping[str, Any] | None, params: Mapping[str, Any], root: Path) -> bool:
    if not manifest or not manifest.get("complete"):
        return False
    if manifest.get("generator") != GENERATOR_NAME or manifest.get("version") != GENERATOR_VERSION:
        return False
    if manifest.get("params") != params:
        return False
    entries = [*manifest.get("files", {}).values(), *manifest.get("dirs", [])]
    return all(_resolve(entry, root).exists() for entry in entries)


def generate_world(
    root: str | os.PathLike[str],
    seed: int = 0,
    *,
    n_train: int = DEFAULT_WORLD_SIZES["n_train"],
    n_pretrain: int = DEFAULT_WORLD_SIZES["n_pretrain"],
    n_instruct: int = DEFAULT_WORLD_SIZES["n_instruct"],
    n_eval: int = DEFAULT_WORLD_SIZES["n_eval"],
    n_mmvet: int = DEFAULT_WORLD_SIZES["n_mmvet"],
    n_retrieval: int = DEFAULT_WORLD_SIZES["n_retrieval"],
    n_zeroshot_per_class: int = DEFAULT_WORLD_SIZES["n_zeroshot_per_class"],
    n_mmvp_pairs: int = DEFAULT_WORLD_SIZES["n_mmvp_pairs"],
    image_size: int = 64,
    eval_dir: str | os.PathLike[str] | None = None,
    config: ShapesConfig | None = None,
    mmbench_answer: str = "text",
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the whole Shapes world under ``root`` and return its manifest (also saved as ``manifest.json``).

    Args:
        root: output folder (created if missing).
        seed: world seed; equal seeds and parameters give byte-identical files.
        n_train: CLIP image-caption pairs.
        n_pretrain: LLaVA projector-pretraining caption samples.
        n_instruct: LLaVA instruction samples with an image (text-only samples are added on top).
        n_eval: rows of ``mmbench_en_dev.parquet`` and of ``vizwiz_vqa_val.parquet``.
        n_mmvet: rows of ``mmvet.parquet`` (every row needs an LLM judge when evaluated).
        n_retrieval: images of the COCO-style retrieval set (5 captions each).
        n_zeroshot_per_class: images per class of every zero-shot attribute tree.
        n_mmvp_pairs: MMVP-VLM pairs per attribute.
        image_size: image side in pixels, 32 to 96.
        eval_dir: folder for the three parquet files (default ``root/eval/data``).
        mmbench_answer: how the instruction data answers MMBench-format turns (`mmbench_target`): ``"text"``
            (default; the option's text, which MMBench's matcher maps to its letter), ``"text-letter"``
            or ``"letter"`` (LLaVA-1.5's format; the tiny default LM does not learn to read options, see
            docs/results.md).
        config: world vocabulary and difficulty (default :class:`ShapesConfig`).
        force: regenerate even if ``manifest.json`` already describes this exact world.
        progress: show tqdm progress bars.

    If ``root/manifest.json`` records a complete run with identical parameters and its files exist, nothing
    is written and that manifest is returned. Otherwise the outputs that an earlier run recorded (in its
    manifest, or in the ``.shapes_in_progress.json`` marker of an interrupted run) are removed first, so no
    stale images survive a smaller rerun. Give the world a folder of its own: ``clip_train/``, ``llava/``
    and ``encoder_eval/`` under ``root`` belong to the generator.
    """
    seed = _check_seed(seed)
    sizes = {
        "n_train": n_train,
        "n_pretrain": n_pretrain,
        "n_instruct": n_instruct,
        "n_eval": n_eval,
        "n_mmvet": n_mmvet,
        "n_retrieval": n_retrieval,
        "n_zeroshot_per_class": n_zeroshot_per_class,
        "n_mmvp_pairs": n_mmvp_pairs,
    }
    sizes = {name: _check_positive(name, value) for name, value in sizes.items()}
    image_size = _check_image_size(image_size)
    _check_mmbench_answer(mmbench_answer)
    config = config or DEFAULT_CONFIG
    root = Path(root)
    eval_path = Path(eval_dir) if eval_dir is not None else root / "eval" / "data"
    params: dict[str, Any] = {
        "seed": seed,
        **sizes,
        "image_size": image_size,
        "eval_dir": None if eval_dir is None else str(Path(eval_dir).resolve()),
        "config": config.to_dict(),
        "mmbench_answer": mmbench_answer,
    }
    manifest_path = root / _MANIFEST
    if not force and _manifest_is_current(_read_json(manifest_path), params, root):
        return _read_json(manifest_path) or {}

    root.mkdir(parents=True, exist_ok=True)
    _remove_previous_outputs(root)
    planned = {
        "generator": GENERATOR_NAME,
        "dirs": list(_OWNED_DIRS),
        "files": {key: _relative(eval_path / name, root) for key, name in _EVAL_FILES.items()},
    }
    _write_json(root / _IN_PROGRESS, planned)

    common = {"seed": seed, "image_size": image_size, "config": config, "progress": progress}
    result = WriteResult()
    result.update(write_clip_pairs(root / "clip_train", sizes["n_train"], **common))
    result.update(write_llava_pretrain(root / "llava", sizes["n_pretrain"], **common))
    result.update(write_llava_instruct(root / "llava", sizes["n_instruct"], mmbench_answer=mmbench_answer, **common))
    result.update(write_mmbench(eval_path / _EVAL_FILES["mmbench_en_dev"], sizes["n_eval"], **common))
    result.update(write_vizwiz(eval_path / _EVAL_FILES["vizwiz_vqa_val"], sizes["n_eval"], **common))
    result.update(write_mmvet(eval_path / _EVAL_FILES["mmvet"], sizes["n_mmvet"], **common))
    encoder = root / "encoder_eval"
    result.update(write_retrieval(encoder / "retrieval", sizes["n_retrieval"], **common))
    result.update(write_zeroshot(encoder / "zeroshot", sizes["n_zeroshot_per_class"], **common))
    result.update(write_mmvp_vlm(encoder / "mmvp_vlm", sizes["n_mmvp_pairs"], **common))

    manifest = {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "complete": True,
        "params": params,
        "counts": dict(sorted(result.counts.items())),
        "files": {key: _relative(path, root) for key, path in sorted(result.files.items())},
        "dirs": sorted({_relative(path, root) for path in result.dirs}),
    }
    tmp = root / (_MANIFEST + ".tmp")
    _write_text(tmp, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)
    (root / _IN_PROGRESS).unlink(missing_ok=True)
    return json.loads(manifest_path.read_text(encoding="utf-8"))
