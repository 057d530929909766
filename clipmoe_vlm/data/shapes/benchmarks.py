"""The lmms-eval benchmark parquet files: MMBench-EN dev, VizWiz-VQA val and MM-Vet.

Images are stored as Hugging Face image datasets store them (a struct of PNG ``bytes`` and ``path``, with the
``datasets`` feature types in the schema metadata), so ``datasets.load_dataset("parquet", ...)`` decodes them
to PIL and lmms-eval 0.7.3's ``mmbench_en_dev``, ``vizwiz_vqa_val`` and ``mmvet`` task functions read the rows
unchanged. The columns are those of the ``lmms-lab`` datasets (`clipmoe_vlm.lmms.schemas`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from ...lmms.schemas import mmbench_features, mmvet_features, vizwiz_features
from .language import _CORNERS, _RELATION_ANSWER, _count_word, canonical_caption, refer, relations
from .questions import (
    _HINTS,
    _UNANSWERABLE_QUESTIONS,
    QA,
    QA_KINDS,
    _available_kinds,
    _mc_options,
    make_qa,
)
from .render import _png_bytes, render_scene
from .world import Scene, ShapesConfig, _check_positive, _pick, item_rng, sample_scene
from .writers import WriteResult, _image_cell, _progress, _setup, _write_parquet

_MMBENCH_CATEGORIES: tuple[str, ...] = ("color", "shape", "size", "fill", "position", "count", "relation")
_MMBENCH_L2: Mapping[str, str] = MappingProxyType(
    {
        "color": "coarse_perception",
        "shape": "coarse_perception",
        "size": "finegrained_perception (instance-level)",
        "fill": "finegrained_perception (instance-level)",
        "position": "finegrained_perception (instance-level)",
        "count": "finegrained_perception (cross-instance)",
        "relation": "finegrained_perception (cross-instance)",
    }
)
_MMVET_KINDS: tuple[str, ...] = (
    "color",
    "shape",
    "size",
    "fill",
    "position",
    "count",
    "relation",
    "list_colors",
    "list_shapes",
    "corners",
    "count_plus",
    "describe",
)
_MMVET_CAPABILITY: Mapping[str, str] = MappingProxyType(
    {
        "color": "rec",
        "shape": "rec",
        "size": "rec",
        "fill": "rec",
        "position": "rec,spat",
        "count": "rec",
        "relation": "rec,spat",
        "list_colors": "rec",
        "list_shapes": "rec",
        "corners": "rec,know",
        "count_plus": "rec,math",
        "describe": "rec,gen",
    }
)


def write_mmbench(
    path: str | os.PathLike[str],
    n: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    config: ShapesConfig | None = None,
    hint_fraction: float = 0.4,
    progress: bool = True,
) -> WriteResult:
    """An MMBench-EN dev parquet (lmms-eval ``mmbench_en_dev`` columns); ``category`` is the attribute asked."""
    n = _check_positive("n", n)
    seed, image_size, config = _setup(seed, image_size, config)
    path = Path(path)
    categories = [c for c in _MMBENCH_CATEGORIES if c != "relation" or config.max_count >= 2]
    rows = []
    for i in _progress(range(n), "mmbench", n, progress):
        rng = item_rng(seed, "mmbench_en_dev", i)
        category = categories[i % len(categories)]
        n_objects = int(rng.integers(2, config.max_count + 1)) if category == "relation" else None
        scene = sample_scene(rng, config, n_objects=n_objects)
        qa = make_qa(scene, category, rng, config)
        options, letter = _mc_options(qa, rng)
        row: dict[str, Any] = {"index": i, "question": qa.mc_question}
        row["hint"] = _HINTS[category] if rng.random() < hint_fraction else None
        for k, letter_k in enumerate("ABCD"):
            row[letter_k] = options[k] if k < len(options) else None
        row.update(
            {
                "answer": letter,
                "category": category,
                "image": _image_cell(_png_bytes(render_scene(scene, image_size, config)), f"{i}.png"),
                "source": "shapes",
                "L2-category": _MMBENCH_L2[category],
                "comment": None,
                "split": "dev",
            }
        )
        rows.append(row)
    _write_parquet(path, rows, mmbench_features("ABCD"))
    return WriteResult(files={"mmbench_en_dev": path}, counts={"mmbench_en_dev": n})


def _surface_forms(answer: str) -> list[str]:
    forms = [answer, answer.capitalize(), answer + "."]
    if answer.isdigit():
        forms.append(_count_word(int(answer)))
    return forms


def _human_answers(qa: QA, rng: np.random.Generator, config: ShapesConfig) -> list[str]:
    """Ten simulated annotator answers: the truth at least 7 times (in varied surface forms that VQA
    normalization maps back to it), plus up to 3 confusions, none of them more than twice."""
    n_right = int(rng.integers(7, 11))
    forms = _surface_forms(qa.answer)
    answers = [_pick(rng, forms) for _ in range(n_right)]
    if qa.answer in ("yes", "no"):
        wrong = ["no" if qa.answer == "yes" else "yes"]
    elif qa.kind == "count":
        wrong = [str(k) for k in (int(qa.answer) - 1, int(qa.answer) + 1) if k >= 1]
    else:
        wrong = [v for v in config.values(qa.kind) if v != qa.answer]
    wrong.append("unanswerable")
    pool = [wrong[int(k)] for k in rng.permutation(len(wrong))] * 2
    answers += pool[: 10 - n_right]
    return [answers[int(k)] for k in rng.permutation(len(answers))]


def write_vizwiz(
    path: str | os.PathLike[str],
    n: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    config: ShapesConfig | None = None,
    unanswerable_fraction: float = 0.1,
    progress: bool = True,
) -> WriteResult:
    """A VizWiz-VQA val parquet (lmms-eval ``vizwiz_vqa_val`` columns) with ten answers per question.

    Every ``round(1 / unanswerable_fraction)``-th question asks for something the image cannot show
    (text, brand, price ...) and is answered "unanswerable" by the majority.
    """
    n = _check_positive("n", n)
    seed, image_size, config = _setup(seed, image_size, config)
    if not 0.0 <= unanswerable_fraction <= 0.5:
        raise ValueError(f"unanswerable_fraction must be in [0, 0.5], got {unanswerable_fraction}")
    period = max(2, round(1 / unanswerable_fraction)) if unanswerable_fraction > 0 else 0
    path = Path(path)
    rows = []
    for i in _progress(range(n), "vizwiz", n, progress):
        rng = item_rng(seed, "vizwiz_vqa_val", i)
        scene = sample_scene(rng, config)
        question_id = f"shapes_val_{i:08d}"
        if period and i % period == period - 1:
            ref = refer(scene, int(rng.integers(scene.count)), rng)
            question = _pick(rng, _UNANSWERABLE_QUESTIONS).format(r=ref)
            n_right = int(rng.integers(6, 11))
            answers = ["unanswerable"] * n_right + [
                _pick(rng, ("unsuitable", "no text", "nothing")) for _ in range(10 - n_right)
            ]
            answers = [answers[int(k)] for k in rng.permutation(10)]
            category = "unanswerable"
        else:
            qa = make_qa(scene, _pick(rng, _available_kinds(scene, QA_KINDS)), rng, config)
            question = qa.question[:1].lower() + qa.question[1:]
            answers = _human_answers(qa, rng, config)
            category = "yes/no" if qa.answer in ("yes", "no") else "number" if qa.kind == "count" else "other"
        rows.append(
            {
                "question_id": question_id,
                "image": _image_cell(_png_bytes(render_scene(scene, image_size, config)), f"{question_id}.png"),
                "question": question,
                "answers": answers,
                "category": category,
            }
        )
    _write_parquet(path, rows, vizwiz_features())
    return WriteResult(files={"vizwiz_vqa_val": path}, counts={"vizwiz_vqa_val": n})


def _mmvet_item(kind: str, rng: np.random.Generator, config: ShapesConfig) -> tuple[Scene, str, str, str]:
    """(scene, question, answer with <AND>/<OR>, capability) for one MM-Vet style item."""
    if kind == "corners":
        cornered = [s for s in config.shapes if s in _CORNERS]
        if not cornered:
            kind = "count"
        else:
            scene = sample_scene(rng, config)
            candidates = [k for k, o in enumerate(scene.objects) if o.shape in _CORNERS]
            if not candidates:
                scene = sample_scene(rng, config, n_objects=1, fixed={"shape": _pick(rng, cornered)})
                candidates = [0]
            index = _pick(rng, candidates)
            k = _CORNERS[scene.objects[index].shape]
            ref = refer(scene, index, rng, exclude={"shape"})
            return (
                scene,
                f"How many corners does the {ref} have?",
                f"{k}<OR>{_count_word(k)}",
                _MMVET_CAPABILITY["corners"],
            )
    if kind == "relation":
        if config.max_count < 2:
            kind = "position"
        else:
            scene = sample_scene(rng, config, n_objects=int(rng.integers(2, config.max_count + 1)))
            i, j = (int(k) for k in rng.permutation(scene.count)[:2])
            ra, rb = refer(scene, i, rng, exclude={"position"}), refer(scene, j, rng, exclude={"position"})
            true = relations(scene.objects[i], scene.objects[j], config)
            answer = "<OR>".join(_RELATION_ANSWER[r] for r in true)
            return scene, f"Where is the {ra} relative to the {rb}?", answer, _MMVET_CAPABILITY["relation"]
    scene = sample_scene(rng, config)
    if kind in ("color", "shape", "size", "fill", "position", "count"):
        qa = make_qa(scene, kind, rng, config)
        answer = "<OR>".join(dict.fromkeys(qa.alternatives))
        return scene, qa.question, answer, _MMVET_CAPABILITY[kind]
    if kind == "list_colors":
        question = _pick(rng, ("Which colors appear in the image?", "List the colors of all shapes in the image."))
        answer = "<AND>".join(sorted({o.color for o in scene.objects}))
    elif kind == "list_shapes":
        question = _pick(rng, ("Which kinds of shapes can you see in the image?", "Name every shape in the image."))
        answer = "<AND>".join(sorted({o.shape for o in scene.objects}))
    elif kind == "count_plus":
        question = "If one more shape were added to the image, how many shapes would there be?"
        answer = f"{scene.count + 1}<OR>{_count_word(scene.count + 1)}"
    elif kind == "describe":
        question = "Describe the image in one sentence, mentioning the color, size, fill and position of each shape."
        answer = canonical_caption(scene)
    else:
        raise ValueError(f"unknown MM-Vet item kind {kind!r}")
    return scene, question, answer, _MMVET_CAPABILITY[kind]


def write_mmvet(
    path: str | os.PathLike[str],
    n: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    config: ShapesConfig | None = None,
    progress: bool = True,
) -> WriteResult:
    """An MM-Vet parquet (lmms-eval ``mmvet`` columns): open answers with ``<AND>``/``<OR>``, a capability tag."""
    n = _check_positive("n", n)
    seed, image_size, config = _setup(seed, image_size, config)
    path = Path(path)
    rows = []
    for i in _progress(range(n), "mmvet", n, progress):
        rng = item_rng(seed, "mmvet", i)
        scene, question, answer, capability = _mmvet_item(_MMVET_KINDS[i % len(_MMVET_KINDS)], rng, config)
        rows.append(
            {
                "question_id": f"v1_{i}",
                "image": _image_cell(_png_bytes(render_scene(scene, image_size, config)), f"v1_{i}.png"),
                "question": question,
                "answer": answer,
                "image_source": "shapes",
                "capability": capability,
            }
        )
    _write_parquet(path, rows, mmvet_features())
    return WriteResult(files={"mmvet": path}, counts={"mmvet": n})
