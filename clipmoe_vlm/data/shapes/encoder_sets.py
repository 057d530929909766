"""Encoder evaluation sets: COCO-style retrieval, ImageNet-style zero-shot folders and MMVP-VLM pairs.

MMVP-VLM follows the layout the upstream evaluation script of Tong et al. ("Eyes Wide Shut", dataset
``MMVP/MMVP_VLM``) reads: ``Questions.csv`` has one row per statement, consecutive rows (ids ``2k-1``, ``2k``)
form a pair, statement ``q`` is true for image ``<Type>/<q>.jpg`` and false for the other image of its pair,
and the script prepends ``"a photo of "``. Here the two images of a pair differ in exactly the attribute the
``Type`` names (Color, Shape, Size, Fill, Position or Quantity); ``pairs.jsonl`` is an extra file the real
benchmark does not have.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

from .language import _canonical_object, _count_word, _plural, caption_scene
from .render import _jpeg_bytes, _png_bytes, render_scene
from .world import (
    ATTRIBUTES,
    GENERATOR_VERSION,
    Scene,
    ShapesConfig,
    _check_positive,
    _pick,
    item_rng,
    sample_scene,
)
from .writers import WriteResult, _progress, _save_image, _setup, _write_csv, _write_json, _write_jsonl

_MMVP_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "color": "Color",
        "shape": "Shape",
        "size": "Size",
        "fill": "Fill",
        "position": "Position",
        "count": "Quantity",
    }
)
# Counting prompts: the number is the class; colours vary per object, so no nuisance is named.
_COUNT_TEMPLATES = ("{} shapes.", "there are {} objects.", "an image with {} shapes.")


def zeroshot_templates(attribute: str, config: ShapesConfig) -> list[str]:
    """Prompt templates (``{}``: the class) for zero-shot classification of ``attribute``.

    Every training caption states each object's colour and shape, so a prompt without them ("a circle.") is
    far from anything the text tower was trained on, and zero-shot shape sat at chance even for models whose
    image features separate shapes. The class embedding is therefore the mean over prompts that name every
    value of these nuisance attributes: shape is prompted as "the red {}.", "the blue {}.", ...; size, fill and
    position over every colour x shape. ("the", as in the captions' relation sentences, avoids a/an.)
    """
    colors, shapes = config.values("color"), config.values("shape")
    if attribute == "color":
        return [f"the {{}} {shape}." for shape in shapes]
    if attribute == "shape":
        return [f"the {color} {{}}." for color in colors]
    if attribute in ("size", "fill"):
        return [f"the {{}} {color} {shape}." for color in colors for shape in shapes]
    if attribute == "position":
        return [f"the {color} {shape} at the {{}} of the image." for color in colors for shape in shapes]
    if attribute == "count":
        return list(_COUNT_TEMPLATES)
    raise ValueError(f"unknown attribute {attribute!r}")


def write_retrieval(
    out_dir: str | os.PathLike[str],
    n: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    config: ShapesConfig | None = None,
    captions_per_image: int = 5,
    progress: bool = True,
) -> WriteResult:
    """COCO-captions style retrieval set: ``images/*.png`` and ``captions.json`` (distinct captions per image)."""
    n = _check_positive("n", n)
    captions_per_image = _check_positive("captions_per_image", captions_per_image)
    seed, image_size, config = _setup(seed, image_size, config)
    out = Path(out_dir)
    images, annotations, scenes = [], [], []
    for i in _progress(range(n), "retrieval", n, progress):
        rng = item_rng(seed, "retrieval", i)
        scene = sample_scene(rng, config)
        file_name = f"{i + 1:06d}.png"
        _save_image(out / "images" / file_name, _png_bytes(render_scene(scene, image_size, config)))
        captions: list[str] = []
        for _ in range(50 * captions_per_image):
            caption = caption_scene(scene, rng, config)
            if caption not in captions:
                captions.append(caption)
            if len(captions) == captions_per_image:
                break
        while len(captions) < captions_per_image:  # tiny vocabularies: allow repeats rather than fail
            captions.append(caption_scene(scene, rng, config))
        images.append({"id": i + 1, "file_name": file_name, "width": image_size, "height": image_size})
        for caption in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "caption": caption})
        scenes.append({"image": f"images/{file_name}", **scene.to_dict()})
    coco = {
        "info": {"description": "Shapes world retrieval set", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
    }
    _write_json(out / "captions.json", coco)
    _write_jsonl(out / "scenes.jsonl", scenes)
    return WriteResult(
        files={"retrieval_captions": out / "captions.json", "retrieval_scenes": out / "scenes.jsonl"},
        dirs=[out],
        counts={"retrieval_images": n, "retrieval_captions": len(annotations)},
    )


def _class_name(attribute: str, value: str) -> str:
    return _count_word(int(value)) if attribute == "count" else value


def write_zeroshot(
    out_dir: str | os.PathLike[str],
    n_per_class: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    config: ShapesConfig | None = None,
    attributes: Sequence[str] = ATTRIBUTES,
    progress: bool = True,
) -> WriteResult:
    """ImageNet-style class folders per attribute: ``<attribute>/<class>/00001.png``.

    Images hold a single object (for ``count``, that many objects), so the class is unambiguous. Each
    attribute folder also gets ``classnames.json`` (sorted folder names, i.e. ``ImageFolder`` class
    order) and ``templates.json`` (prompt templates with a ``{}`` slot).
    """
    n_per_class = _check_positive("n_per_class", n_per_class)
    seed, image_size, config = _setup(seed, image_size, config)
    out = Path(out_dir)
    result = WriteResult(dirs=[out])
    jobs = [(a, v, k) for a in attributes for v in config.values(a) for k in range(n_per_class)]
    for attribute, value, k in _progress(jobs, "zero-shot", len(jobs), progress):
        rng = item_rng(seed, f"zeroshot/{attribute}/{value}", k)
        if attribute == "count":
            scene = sample_scene(rng, config, n_objects=int(value))
        else:
            scene = sample_scene(rng, config, n_objects=1, fixed={attribute: value})
        path = out / attribute / _class_name(attribute, value) / f"{k + 1:05d}.png"
        _save_image(path, _png_bytes(render_scene(scene, image_size, config)))
    for attribute in attributes:
        classes = sorted(_class_name(attribute, v) for v in config.values(attribute))
        _write_json(out / attribute / "classnames.json", classes)
        _write_json(out / attribute / "templates.json", zeroshot_templates(attribute, config))
        result.files[f"zeroshot_{attribute}_classnames"] = out / attribute / "classnames.json"
        result.files[f"zeroshot_{attribute}_templates"] = out / attribute / "templates.json"
        result.counts[f"zeroshot_{attribute}"] = len(classes) * n_per_class
    return result


def _mmvp_pair(attribute: str, rng: np.random.Generator, config: ShapesConfig) -> tuple[Scene, Scene, str, str]:
    """Two scenes that differ only in ``attribute``, and a statement true for each."""
    if attribute == "count":
        counts = [int(v) for v in config.values("count")]
        n1 = _pick(rng, counts)
        n2 = _pick(rng, [c for c in counts if c != n1])
        first = sample_scene(rng, config, n_objects=n1, identical=True)
        second_layout = sample_scene(rng, config, n_objects=n2, identical=True)
        template = first.objects[0]
        second = Scene(tuple(replace(template, position=o.position, offset=o.offset) for o in second_layout.objects))

        def statement(scene: Scene) -> str:
            obj = scene.objects[0]
            noun = obj.shape if scene.count == 1 else _plural(obj.shape)
            return f"{_count_word(scene.count)} {obj.size} {obj.fill} {obj.color} {noun}"

        return first, second, statement(first), statement(second)
    first = sample_scene(rng, config, n_objects=1)
    value = first.objects[0].attribute(attribute)
    other = _pick(rng, [v for v in config.values(attribute) if v != value])
    second = Scene((replace(first.objects[0], **{attribute: other}),))
    return first, second, _canonical_object(first.objects[0]), _canonical_object(second.objects[0])


def write_mmvp_vlm(
    out_dir: str | os.PathLike[str],
    n_pairs_per_attribute: int = 15,
    *,
    seed: int = 0,
    image_size: int = 64,
    config: ShapesConfig | None = None,
    attributes: Sequence[str] = ATTRIBUTES,
    progress: bool = True,
) -> WriteResult:
    """An MMVP-VLM style benchmark: ``Questions.csv`` and ``MLLM_VLM Images/<Type>/<qid>.jpg``.

    Pairs of consecutive question ids (odd, even) show two images that differ in exactly one attribute;
    each statement is true for the image with its own id. ``pairs.jsonl`` records both scenes.
    """
    n_pairs = _check_positive("n_pairs_per_attribute", n_pairs_per_attribute)
    seed, image_size, config = _setup(seed, image_size, config)
    out = Path(out_dir)
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"write_mmvp_vlm: unknown attributes {unknown}; expected some of {list(ATTRIBUTES)}")
    usable = [a for a in attributes if len(config.values(a)) >= 2]  # a pair needs two values
    rows, pairs = [], []
    qid = 1
    jobs = [(a, p) for a in usable for p in range(n_pairs)]
    for attribute, p in _progress(jobs, "mmvp-vlm", len(jobs), progress):
        rng = item_rng(seed, f"mmvp_vlm/{attribute}", p)
        first, second, statement1, statement2 = _mmvp_pair(attribute, rng, config)
        type_name = _MMVP_TYPES[attribute]
        for offset, scene in ((0, first), (1, second)):
            path = out / "MLLM_VLM Images" / type_name / f"{qid + offset}.jpg"
            _save_image(path, _jpeg_bytes(render_scene(scene, image_size, config)))
        rows.append((qid, type_name, statement1))
        rows.append((qid + 1, type_name, statement2))
        value1 = str(first.count) if attribute == "count" else first.objects[0].attribute(attribute)
        value2 = str(second.count) if attribute == "count" else second.objects[0].attribute(attribute)
        pairs.append(
            {
                "qid1": qid,
                "qid2": qid + 1,
                "type": type_name,
                "attribute": attribute,
                "value1": value1,
                "value2": value2,
                "scene1": first.to_dict(),
                "scene2": second.to_dict(),
            }
        )
        qid += 2
    _write_csv(out / "Questions.csv", ("Question ID", "Type", "Statement"), rows)
    _write_jsonl(out / "pairs.jsonl", pairs)
    return WriteResult(
        files={"mmvp_vlm_questions": out / "Questions.csv", "mmvp_vlm_pairs": out / "pairs.jsonl"},
        dirs=[out],
        counts={"mmvp_vlm_pairs": len(pairs)},
    )
