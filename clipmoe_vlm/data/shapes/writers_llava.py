"""Training data: CLIP image-caption pairs and the LLaVA-1.5 pretraining and instruction JSON."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from .language import _CORNERS, _count_word, _join, _sentence, _with_article, caption_scene
from .questions import QA_KINDS, _available_kinds, _check_mmbench_answer, _format_turn, make_qa
from .render import _png_bytes, render_scene
from .world import ShapesConfig, _check_positive, _pick, item_rng, sample_scene
from .writers import WriteResult, _progress, _save_image, _setup, _write_csv, _write_json, _write_jsonl

_PRETRAIN_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "Give a concise description of the picture.",
    "What does this image show? Answer in one sentence.",
    "Summarize the visual content of the image.",
    "Provide a brief caption for the image.",
    "Describe what you see in a few words.",
    "Write a one-sentence description of this picture.",
)
#: Word pairs for the "opposite of" questions of the text-only samples.
_OPPOSITES: Mapping[str, str] = MappingProxyType(
    {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "small": "large", "large": "small",
     "filled": "outlined", "above": "below", "below": "above"}
)  # fmt: skip


def write_clip_pairs(
    out_dir: str | os.PathLike[str],
    n: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    config: ShapesConfig | None = None,
    progress: bool = True,
) -> WriteResult:
    """``n`` image-caption pairs: ``images/*.png``, ``captions.jsonl``, ``captions.csv``, ``scenes.jsonl``."""
    n = _check_positive("n", n)
    seed, image_size, config = _setup(seed, image_size, config)
    out = Path(out_dir)
    rows, scenes = [], []
    for i in _progress(range(n), "clip pairs", n, progress):
        rng = item_rng(seed, "clip_train", i)
        scene = sample_scene(rng, config)
        name = f"images/{i + 1:06d}.png"
        _save_image(out / name, _png_bytes(render_scene(scene, image_size, config)))
        rows.append({"image": name, "caption": caption_scene(scene, rng, config)})
        scenes.append({"image": name, **scene.to_dict()})
    _write_jsonl(out / "captions.jsonl", rows)
    _write_csv(out / "captions.csv", ("image", "caption"), ((r["image"], r["caption"]) for r in rows))
    _write_jsonl(out / "scenes.jsonl", scenes)
    return WriteResult(
        files={
            "clip_train_jsonl": out / "captions.jsonl",
            "clip_train_csv": out / "captions.csv",
            "clip_train_scenes": out / "scenes.jsonl",
        },
        dirs=[out],
        counts={"clip_train": n},
    )


def write_llava_pretrain(
    out_dir: str | os.PathLike[str],
    n: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    config: ShapesConfig | None = None,
    progress: bool = True,
) -> WriteResult:
    """LLaVA projector-pretraining captions: ``pretrain.json`` and ``images/pretrain/*.png`` under ``out_dir``."""
    n = _check_positive("n", n)
    seed, image_size, config = _setup(seed, image_size, config)
    out = Path(out_dir)
    samples = []
    for i in _progress(range(n), "llava pretrain", n, progress):
        rng = item_rng(seed, "llava_pretrain", i)
        scene = sample_scene(rng, config)
        name = f"images/pretrain/{i + 1:06d}.png"
        _save_image(out / name, _png_bytes(render_scene(scene, image_size, config)))
        instruction = _pick(rng, _PRETRAIN_INSTRUCTIONS)
        samples.append(
            {
                "id": f"shapes_pretrain_{i + 1:06d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{instruction}"},
                    {"from": "gpt", "value": caption_scene(scene, rng, config)},
                ],
            }
        )
    _write_json(out / "pretrain.json", samples)
    return WriteResult(
        files={"llava_pretrain_json": out / "pretrain.json"},
        dirs=[out / "images" / "pretrain"],
        counts={"llava_pretrain": n},
    )


def _text_only_sample(index: int, rng: np.random.Generator, config: ShapesConfig) -> dict[str, Any]:
    """A conversation without an image, about the world's vocabulary (as LLaVA's mix has text-only data)."""
    turns: list[tuple[str, str]] = []
    for _ in range(int(rng.integers(1, 3))):
        topic = int(rng.integers(4))
        if topic == 0:
            shape = _pick(rng, sorted(_CORNERS))
            k = _CORNERS[shape]
            turns.append(
                (
                    f"How many corners does {_with_article(shape)} have?",
                    f"{_sentence(_with_article(shape))} has {_count_word(k)} corners.",
                )
            )
        elif topic == 1:
            word = _pick(rng, sorted(_OPPOSITES))
            turns.append((f'What is the opposite of "{word}"?', f'The opposite of "{word}" is "{_OPPOSITES[word]}".'))
        elif topic == 2:
            k = int(rng.integers(2, min(5, len(config.color_names)) + 1))
            colors = [config.color_names[int(c)] for c in rng.permutation(len(config.color_names))[:k]]
            turns.append((f"Name {_count_word(k)} colors.", _sentence(_join(colors)) + "."))
        else:
            k = int(rng.integers(3, 8))
            turns.append((f"Count from one to {_count_word(k)}.", ", ".join(str(v) for v in range(1, k + 1)) + "."))
    conversations = []
    for question, answer in turns:
        conversations.append({"from": "human", "value": question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": f"shapes_text_{index + 1:06d}", "conversations": conversations}


def write_llava_instruct(
    out_dir: str | os.PathLike[str],
    n: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    config: ShapesConfig | None = None,
    text_only_fraction: float = 0.03,
    mmbench_answer: str = "text",
    progress: bool = True,
) -> WriteResult:
    """LLaVA instruction-tuning set: ``instruct.json`` and ``images/instruct/*.png`` under ``out_dir``.

    ``n`` image samples with 2-4 QA turns each (short-answer, long-answer and multiple-choice styles, plus
    the two benchmark prompt styles as lmms-eval renders them: MMBench multiple choice with an optional hint
    and "There are several options:", and VizWiz short answers with the "Unanswerable" instruction, a share
    of them unanswerable from the image; ``<image>`` only in the first human turn), plus
    ``max(1, round(n * text_only_fraction))`` text-only samples (none when the fraction is 0), shuffled
    together deterministically. ``mmbench_answer`` picks the
    answer of the MMBench-format turns (`mmbench_target`; default ``"text"``, the option's text).
    """
    n = _check_positive("n", n)
    seed, image_size, config = _setup(seed, image_size, config)
    if not 0.0 <= text_only_fraction < 1.0:
        raise ValueError(f"text_only_fraction must be in [0, 1), got {text_only_fraction}")
    _check_mmbench_answer(mmbench_answer)
    out = Path(out_dir)
    samples: list[dict[str, Any]] = []
    styles = ("short", "long", "mc", "mmbench", "vizwiz")
    style_p = np.array([0.2, 0.2, 0.1, 0.25, 0.25])
    for i in _progress(range(n), "llava instruct", n, progress):
        rng = item_rng(seed, "llava_instruct", i)
        scene = sample_scene(rng, config)
        name = f"images/instruct/{i + 1:06d}.png"
        _save_image(out / name, _png_bytes(render_scene(scene, image_size, config)))
        kinds = _available_kinds(scene, QA_KINDS)
        n_turns = int(rng.integers(2, 5))
        conversations = []
        for turn, k in enumerate(rng.permutation(len(kinds))[:n_turns]):
            qa = make_qa(scene, kinds[int(k)], rng, config)
            style = styles[int(rng.choice(len(styles), p=style_p))]
            question, answer = _format_turn(qa, style, rng, scene=scene, config=config,
                                            mmbench_answer=mmbench_answer)
            if turn == 0:
                question = f"<image>\n{question}"
            conversations.append({"from": "human", "value": question})
            conversations.append({"from": "gpt", "value": answer})
        samples.append({"id": f"shapes_instruct_{i + 1:06d}", "image": name, "conversations": conversations})
    n_text = max(1, round(n * text_only_fraction)) if text_only_fraction > 0 else 0
    for j in range(n_text):
        samples.append(_text_only_sample(j, item_rng(seed, "llava_text_only", j), config))
    order = item_rng(seed, "llava_instruct_order", 0).permutation(len(samples))
    _write_json(out / "instruct.json", [samples[int(k)] for k in order])
    return WriteResult(
        files={"llava_instruct_json": out / "instruct.json"},
        dirs=[out / "images" / "instruct"],
        counts={"llava_instruct": n, "llava_instruct_text_only": n_text},
    )
