"""The Shapes world: a small, deterministic, procedurally generated image–text world.

The toolkit carries this world so that every pipeline (CLIP training and upcycling, encoder evaluation,
LLaVA projector pretraining and instruction tuning, lmms-eval benchmarks) runs without pretrained weights
or public datasets. Everything is written in the file formats the real data uses, so a default run goes
through the same loaders as a real one.

The world
---------
An image is ``image_size`` pixels square (64 by default, 32 to 96 allowed) with a plain dark background
and 1 to 3 objects. Each object has

* a **color** (red, orange, yellow, green, blue, purple),
* a **shape** (circle, square, triangle, cross; diamond and star are also drawable),
* a **size** (small or large),
* a **fill** (filled, or outlined: only the border is drawn),
* a **position** (left, right, top, bottom or center; objects of one scene sit at distinct positions,
  so with two or more objects relations such as "left of" and "above" are defined),

and the scene has a **count** (the number of objects). Within a scene no two objects share both color
and shape, so "the red circle" always names one object.

Which attributes are easy is a design choice. The MCL paper (arXiv 2402.11816) describes *feature
suppression*: contrastive training learns the most salient feature first and then tends to ignore the
subtler ones, because it already separates most pairs in a batch. The world is built for that. Color
covers every pixel of an object and is the easiest feature, and shape comes next. Fill, size, count and
position change fewer pixels or need spatial reasoning, and color plus shape already tell most captions
in a batch apart. All attributes stay visually decidable, though: anchors are far apart, the two sizes
differ by a factor of about 1.6, and outlines are at least one pixel wide. A good model can therefore
learn all of them. Vocabularies, geometry and how often captions mention each subtle attribute live in
:class:`ShapesConfig` and the ``DEFAULT_*`` constants below.

Determinism: every item is drawn from its own generator, ``numpy.random.default_rng([seed,
crc32(split), index])``. No global random state is used. The same seed and parameters give
byte-identical PNG, JPEG, JSON, CSV and parquet files, and a run with ``n`` items is a prefix of a run
with more.

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

The parquet files store images the way Hugging Face image datasets do: a struct of ``bytes`` (PNG) and
``path``, with the ``datasets`` feature types in the schema metadata. ``datasets.load_dataset("parquet",
...)`` therefore decodes the images to PIL. The columns follow the ``lmms-lab`` datasets that lmms-eval
0.7.3's ``mmbench_en_dev``, ``vizwiz_vqa_val`` and ``mmvet`` tasks read. One difference: MMBench
``index`` is int64, because the upstream aggregation compares it with ``1e6``.

MMVP-VLM layout (Tong et al., "Eyes Wide Shut", dataset ``MMVP/MMVP_VLM``) as the upstream evaluation
script reads it:

* ``Questions.csv`` has one row per statement. Consecutive rows form a pair: question ids ``2k-1`` and
  ``2k``.
* Statement ``q`` is true for image ``<Type>/<q>.jpg`` and false for the other image of its pair.
* The script prepends ``"a photo of "`` to each statement.

Here the two images of a pair differ in exactly one attribute, which the ``Type`` names: Color, Shape,
Size, Fill, Position or Quantity. ``pairs.jsonl`` is an extra file that the real benchmark does not have.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_CONFIG",
    "GENERATOR_VERSION",
    "MC_ANSWER_PROMPT",
    "MMBENCH_ANSWER_STYLES",
    "MMBENCH_OPTIONS_HEADER",
    "QA",
    "QA_KINDS",
    "SHORT_ANSWER_PROMPT",
    "VIZWIZ_POST_PROMPT",
    "mmbench_prompt",
    "mmbench_target",
    "vizwiz_prompt",
    "Scene",
    "ShapeObject",
    "ShapesConfig",
    "WriteResult",
    "canonical_caption",
    "caption_scene",
    "generate_world",
    "item_rng",
    "make_qa",
    "object_rgb",
    "refer",
    "relations",
    "render_scene",
    "sample_scene",
    "write_clip_pairs",
    "write_llava_instruct",
    "write_llava_pretrain",
    "write_mmbench",
    "write_mmvet",
    "write_mmvp_vlm",
    "write_retrieval",
    "write_vizwiz",
    "write_zeroshot",
]

GENERATOR_NAME = "clipmoe_vlm.data.shapes"
#: Bump when the output for a given seed changes; it is part of the cache key in ``manifest.json``.
GENERATOR_VERSION = "1.2"

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 96

#: Attribute names, in the order used for zero-shot trees and MMVP-VLM categories.
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "fill", "position", "count")

RGB = tuple[int, int, int]

# --------------------------------------------------------------------------------------------------
# Vocabulary and difficulty knobs
# --------------------------------------------------------------------------------------------------

#: Color names and base RGB values; each object gets a small per-channel jitter (``color_jitter``).
DEFAULT_COLORS: tuple[tuple[str, RGB], ...] = (
    ("red", (220, 30, 30)),
    ("orange", (255, 140, 0)),
    ("yellow", (245, 225, 30)),
    ("green", (30, 170, 50)),
    ("blue", (40, 80, 235)),
    ("purple", (150, 50, 210)),
)
#: Shapes used by default; any subset of ``SUPPORTED_SHAPES`` may be configured.
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SUPPORTED_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "star")
#: Size names and object radius as a fraction of the image side.
DEFAULT_SIZES: tuple[tuple[str, float], ...] = (("small", 0.08), ("large", 0.13))
#: Fill values are fixed: the renderer knows how to draw exactly these two.
FILLS: tuple[str, ...] = ("filled", "outlined")
#: Position names and anchor points (x, y) as fractions of the image side; (0, 0) is the top-left corner.
DEFAULT_POSITIONS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("left", (0.19, 0.5)),
    ("right", (0.81, 0.5)),
    ("top", (0.5, 0.19)),
    ("bottom", (0.5, 0.81)),
    ("center", (0.5, 0.5)),
)
#: Relative frequency of scenes with 1, 2, 3, ... objects (the length is the maximum count).
DEFAULT_COUNT_WEIGHTS: tuple[float, ...] = (0.4, 0.35, 0.25)

# Wording. Values missing from a table fall back to the value itself, so new colors or sizes need no entry.
_SHAPE_WORDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "circle": ("circle", "round shape"),
        "square": ("square",),
        "triangle": ("triangle",),
        "cross": ("cross", "plus sign"),
        "diamond": ("diamond", "rhombus"),
        "star": ("star",),
    }
)
_SIZE_WORDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"small": ("small", "little", "tiny"), "large": ("large", "big")}
)
_FILL_WORDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"filled": ("filled", "solid"), "outlined": ("outlined", "hollow")}
)
_POSITION_WORDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "left": ("on the left", "at the left side", "in the left part of the image"),
        "right": ("on the right", "at the right side", "in the right part of the image"),
        "top": ("at the top", "near the top", "in the upper part of the image"),
        "bottom": ("at the bottom", "near the bottom", "in the lower part of the image"),
        "center": ("in the center", "in the middle", "at the center of the image"),
    }
)
_POSITION_ANSWERS: Mapping[str, tuple[str, ...]] = MappingProxyType({"center": ("center", "middle")})
_COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_RELATION_WORDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "left of": ("to the left of", "left of"),
        "right of": ("to the right of", "right of"),
        "above": ("above",),
        "below": ("below", "beneath"),
    }
)
_RELATION_ANSWER: Mapping[str, str] = MappingProxyType(
    {"left of": "left", "right of": "right", "above": "above", "below": "below"}
)
_OPPOSITE_RELATION: Mapping[str, str] = MappingProxyType(
    {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
)
_CORNERS: Mapping[str, int] = MappingProxyType({"square": 4, "triangle": 3, "diamond": 4})

#: LLaVA-1.5 style answer-format prompts.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MC_ANSWER_PROMPT = "Answer with the option's letter from the given choices directly."
#: lmms-eval's MMBench option header (``metadata.sys_prompt`` of its ``mmbench.yaml``).
MMBENCH_OPTIONS_HEADER = "There are several options:"
#: lmms-eval's VizWiz-VQA post prompt (``lmms_eval_specific_kwargs.default.post_prompt``).
VIZWIZ_POST_PROMPT = "\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER_PROMPT

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

#: Question kinds understood by :func:`make_qa`.
QA_KINDS: tuple[str, ...] = ("color", "shape", "size", "fill", "position", "count", "relation", "existence")

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
_ZEROSHOT_TEMPLATES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "color": ("a {} shape.", "a {} object on a dark background.", "a picture of a {} shape."),
        "shape": ("a {}.", "a picture of a {}.", "a colored {} on a dark background."),
        "size": ("a {} shape.", "a {} object.", "a picture of a {} shape."),
        "fill": ("a {} shape.", "a {} object.", "a picture of a {} shape."),
        "position": ("a shape at the {} of the image.", "an object at the {}.", "a picture with a shape at the {}."),
        "count": ("{} shapes.", "a picture of {} objects.", "an image with {} shapes."),
    }
)

# --------------------------------------------------------------------------------------------------
# Configuration and scene model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapesConfig:
    """World vocabulary and difficulty knobs; immutable, validated on construction.

    Attributes:
        colors: ``(name, (r, g, b))`` pairs. Colors cover whole objects, so they are the most salient feature.
        shapes: drawable shape names (a subset of ``SUPPORTED_SHAPES``).
        sizes: ``(name, radius)`` pairs, radius as a fraction of the image side.
        positions: ``(name, (x, y))`` anchors as fractions of the image side. The objects of one scene sit
            at distinct anchors.
        count_weights: relative frequency of scenes with 1, 2, ... objects; the length is the maximum count.
        background: background RGB.
        outline_width: outline thickness of ``outlined`` objects as a fraction of their radius (at least one
            pixel). Thinner outlines make fill harder to see.
        color_jitter: per-channel RGB jitter of each object. Larger values make color less trivial.
        position_jitter: anchor jitter as a fraction of the image side.
        mention_size, mention_fill, mention_position: probabilities that a training caption mentions the
            subtle attributes. Color and shape are always mentioned.
        relation_prob: probability that a multi-object caption adds a relation sentence such as "the red
            circle is above the blue square".
        supersample: drawing resolution factor before box-filter downsampling (anti-aliasing).
    """

    colors: tuple[tuple[str, RGB], ...] = DEFAULT_COLORS
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    sizes: tuple[tuple[str, float], ...] = DEFAULT_SIZES
    positions: tuple[tuple[str, tuple[float, float]], ...] = DEFAULT_POSITIONS
    count_weights: tuple[float, ...] = DEFAULT_COUNT_WEIGHTS
    background: RGB = (20, 20, 20)
    outline_width: float = 0.24
    color_jitter: int = 10
    position_jitter: float = 0.01
    mention_size: float = 0.9
    mention_fill: float = 0.9
    mention_position: float = 0.85
    relation_prob: float = 0.5
    supersample: int = 4

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        def names(field_name: str, values: Sequence[str], minimum: int = 2) -> None:
            if len(values) < minimum:
                raise ValueError(f"ShapesConfig.{field_name} needs at least {minimum} entries, got {len(values)}")
            if len(set(values)) != len(values):
                raise ValueError(f"ShapesConfig.{field_name} has duplicate names: {list(values)}")
            for value in values:
                if not isinstance(value, str) or not value or value != value.strip().lower():
                    raise ValueError(
                        f"ShapesConfig.{field_name}: names must be non-empty lowercase strings, got {value!r}"
                    )

        names("colors", [name for name, _ in self.colors])
        for name, rgb in self.colors:
            _check_rgb(f"ShapesConfig.colors[{name!r}]", rgb)
        _check_rgb("ShapesConfig.background", self.background)
        names("shapes", list(self.shapes))
        unknown = [s for s in self.shapes if s not in SUPPORTED_SHAPES]
        if unknown:
            raise ValueError(f"ShapesConfig.shapes: unknown shapes {unknown}; supported: {list(SUPPORTED_SHAPES)}")
        names("sizes", [name for name, _ in self.sizes])
        for name, radius in self.sizes:
            if not 0.02 <= float(radius) <= 0.2:
                raise ValueError(f"ShapesConfig.sizes[{name!r}]: radius fraction must be in [0.02, 0.2], got {radius}")
        names("positions", [name for name, _ in self.positions])
        for name, (x, y) in self.positions:
            if not (0.0 < x < 1.0 and 0.0 < y < 1.0):
                raise ValueError(f"ShapesConfig.positions[{name!r}]: anchor must lie inside (0, 1)^2, got {(x, y)}")
        if not self.count_weights or any(w < 0 for w in self.count_weights) or sum(self.count_weights) <= 0:
            raise ValueError(
                f"ShapesConfig.count_weights must be non-negative with a positive sum, got {self.count_weights}"
            )
        if len(self.count_weights) > len(self.positions):
            raise ValueError(
                f"ShapesConfig.count_weights allows {len(self.count_weights)} objects but there are only "
                f"{len(self.positions)} positions"
            )
        if len(self.count_weights) > len(self.colors) * len(self.shapes):
            raise ValueError("ShapesConfig.count_weights allows more objects than distinct (color, shape) pairs")
        for name in ("mention_size", "mention_fill", "mention_position", "relation_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ShapesConfig.{name} must be a probability in [0, 1], got {value}")
        if not 0.05 <= self.outline_width <= 0.6:
            raise ValueError(f"ShapesConfig.outline_width must be in [0.05, 0.6], got {self.outline_width}")
        if not 0 <= self.color_jitter <= 40:
            raise ValueError(f"ShapesConfig.color_jitter must be in [0, 40], got {self.color_jitter}")
        if not 0.0 <= self.position_jitter <= 0.05:
            raise ValueError(f"ShapesConfig.position_jitter must be in [0, 0.05], got {self.position_jitter}")
        if not 1 <= self.supersample <= 8:
            raise ValueError(f"ShapesConfig.supersample must be in [1, 8], got {self.supersample}")

    @cached_property
    def color_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colors)

    @cached_property
    def color_rgb(self) -> Mapping[str, RGB]:
        return MappingProxyType({name: tuple(rgb) for name, rgb in self.colors})

    @cached_property
    def size_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sizes)

    @cached_property
    def size_radius(self) -> Mapping[str, float]:
        return MappingProxyType({name: float(r) for name, r in self.sizes})

    @cached_property
    def position_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.positions)

    @cached_property
    def anchors(self) -> Mapping[str, tuple[float, float]]:
        return MappingProxyType({name: (float(x), float(y)) for name, (x, y) in self.positions})

    @property
    def max_count(self) -> int:
        return len(self.count_weights)

    def values(self, attribute: str) -> tuple[str, ...]:
        """The possible values of ``attribute`` (counts as digit strings "1", "2", ...)."""
        table = {
            "color": self.color_names,
            "shape": tuple(self.shapes),
            "size": self.size_names,
            "fill": FILLS,
            "position": self.position_names,
            "count": tuple(str(k) for k in range(1, self.max_count + 1) if self.count_weights[k - 1] > 0),
        }
        if attribute not in table:
            raise ValueError(f"unknown attribute {attribute!r}; expected one of {list(ATTRIBUTES)}")
        return table[attribute]

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapesConfig:
        """Inverse of :meth:`to_dict`."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ShapesConfig: unknown keys {unknown}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("colors", "sizes", "positions"):
                kwargs[key] = tuple((str(n), _tuplify(v)) for n, v in value)
            elif key in ("shapes", "count_weights", "background"):
                kwargs[key] = tuple(value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _tuplify(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _check_rgb(name: str, rgb: Sequence[int]) -> None:
    if len(rgb) != 3 or any(not isinstance(c, (int, np.integer)) or not 0 <= c <= 255 for c in rgb):
        raise ValueError(f"{name} must be three integers in [0, 255], got {rgb!r}")


DEFAULT_CONFIG = ShapesConfig()


@dataclass(frozen=True)
class ShapeObject:
    """One object: its attribute values plus the small random jitters that make images differ."""

    color: str
    shape: str
    size: str
    fill: str
    position: str
    color_delta: RGB = (0, 0, 0)
    offset: tuple[float, float] = (0.0, 0.0)

    def attribute(self, name: str) -> str:
        if name not in ("color", "shape", "size", "fill", "position"):
            raise ValueError(f"objects have no attribute {name!r}")
        return str(getattr(self, name))

    def labels(self) -> dict[str, str]:
        return {
            "color": self.color,
            "shape": self.shape,
            "size": self.size,
            "fill": self.fill,
            "position": self.position,
        }


@dataclass(frozen=True)
class Scene:
    """An image description: objects at distinct positions."""

    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)

    @property
    def count(self) -> int:
        return len(self.objects)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "objects": [obj.labels() for obj in self.objects]}


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of item ``index`` of ``split``: independent of all other items."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])


def _pick(rng: np.random.Generator, values: Sequence[Any]) -> Any:
    return values[int(rng.integers(len(values)))]


def _sample_object(
    rng: np.random.Generator, config: ShapesConfig, position: str, fixed: Mapping[str, str]
) -> ShapeObject:
    jitter = config.color_jitter
    delta = tuple(int(v) for v in rng.integers(-jitter, jitter + 1, size=3))
    offset = tuple(float(v) for v in rng.uniform(-config.position_jitter, config.position_jitter, size=2))
    return ShapeObject(
        color=fixed.get("color") or _pick(rng, config.color_names),
        shape=fixed.get("shape") or _pick(rng, config.shapes),
        size=fixed.get("size") or _pick(rng, config.size_names),
        fill=fixed.get("fill") or _pick(rng, FILLS),
        position=position,
        color_delta=delta,  # type: ignore[arg-type]
        offset=offset,  # type: ignore[arg-type]
    )


def sample_scene(
    rng: np.random.Generator,
    config: ShapesConfig | None = None,
    *,
    n_objects: int | None = None,
    fixed: Mapping[str, str] | None = None,
    identical: bool = False,
) -> Scene:
    """Draw a scene.

    ``fixed`` pins attribute values for every object (``position`` only with one object). With
    ``identical=True`` all objects share color, shape, size and fill (used for counting sets);
    otherwise no two objects share both color and shape.
    """
    config = config or DEFAULT_CONFIG
    fixed = dict(fixed or {})
    for key, value in fixed.items():
        if key not in ("color", "shape", "size", "fill", "position"):
            raise ValueError(f"sample_scene: cannot fix attribute {key!r}")
        if value not in config.values(key):
            raise ValueError(f"sample_scene: {value!r} is not a {key} of this world ({list(config.values(key))})")
    if n_objects is None:
        weights = np.asarray(config.count_weights, dtype=np.float64)
        n_objects = 1 + int(rng.choice(len(weights), p=weights / weights.sum()))
    if not 1 <= n_objects <= len(config.positions):
        raise ValueError(f"sample_scene: n_objects must be in [1, {len(config.positions)}], got {n_objects}")
    if "position" in fixed and n_objects != 1:
        raise ValueError("sample_scene: a fixed position needs n_objects == 1")
    if not identical and n_objects > 1 and "color" in fixed and "shape" in fixed:
        raise ValueError("sample_scene: fixing color and shape for several objects needs identical=True")
    if "position" in fixed:
        positions = [fixed["position"]]
    else:
        order = rng.permutation(len(config.positions))[:n_objects]
        positions = [config.position_names[int(k)] for k in order]

    objects: list[ShapeObject] = []
    used: set[tuple[str, str]] = set()
    for position in positions:
        if identical and objects:
            template = _sample_object(rng, config, position, fixed)
            objects.append(replace(objects[0], position=position, offset=template.offset))
            continue
        for _ in range(1000):
            obj = _sample_object(rng, config, position, fixed)
            if (obj.color, obj.shape) not in used:
                break
        else:  # pragma: no cover - impossible after config validation
            raise RuntimeError("sample_scene: could not find a distinct (color, shape) pair")
        used.add((obj.color, obj.shape))
        objects.append(obj)
    return Scene(tuple(objects))


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_image_size(image_size: Any) -> int:
    if not (_is_int(image_size) and MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
        raise ValueError(f"image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}")
    return int(image_size)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` with radius ``r``, vertically centered on its bounding box."""
    points = _raw_polygon(shape, cx, cy, r)
    ys = [y for _, y in points]
    shift = cy - (min(ys) + max(ys)) / 2
    return [(x, y + shift) for x, y in points]


def _raw_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        big = 1.2 * r
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return [(cx + big * float(np.cos(a)), cy + big * float(np.sin(a))) for a in angles]
    if shape == "diamond":
        big = 1.05 * r
        return [(cx, cy - big), (cx + big, cy), (cx, cy + big), (cx - big, cy)]
    if shape == "cross":
        a, w = r, 0.4 * r
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
            (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
            (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    if shape == "star":
        points = []
        for k in range(10):
            radius = 1.1 * r if k % 2 == 0 else 0.47 * r
            angle = np.deg2rad(-90.0 + 36.0 * k)
            points.append((cx + radius * float(np.cos(angle)), cy + radius * float(np.sin(angle))))
        return points
    raise ValueError(f"cannot draw shape {shape!r}; supported: {list(SUPPORTED_SHAPES)}")


def object_rgb(obj: ShapeObject, config: ShapesConfig | None = None) -> RGB:
    """The RGB an object is drawn with: its color's base value plus its jitter."""
    config = config or DEFAULT_CONFIG
    base = config.color_rgb[obj.color]
    return tuple(int(min(255, max(0, b + d))) for b, d in zip(base, obj.color_delta))  # type: ignore[return-value]


def render_scene(scene: Scene, image_size: int = 64, config: ShapesConfig | None = None) -> Image.Image:
    """Draw a scene as an RGB image (supersampled, then box-filtered, so edges are anti-aliased)."""
    config = config or DEFAULT_CONFIG
    image_size = _check_image_size(image_size)
    side = image_size * config.supersample
    canvas = Image.new("RGB", (side, side), tuple(config.background))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        ax, ay = config.anchors[obj.position]
        cx, cy = (ax + obj.offset[0]) * side, (ay + obj.offset[1]) * side
        r = config.size_radius[obj.size] * side
        rgb = object_rgb(obj, config)
        width = max(config.supersample, round(config.outline_width * r))  # at least one output pixel
        filled = obj.fill == "filled"
        if obj.shape == "circle":
            box = (cx - r, cy - r, cx + r, cy + r)
            if filled:
                draw.ellipse(box, fill=rgb)
            else:
                draw.ellipse(box, outline=rgb, width=width)
        else:
            points = _polygon(obj.shape, cx, cy, r)
            if filled:
                draw.polygon(points, fill=rgb)
            else:
                draw.polygon(points, outline=rgb, width=width)
    if config.supersample == 1:
        return canvas
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Language: captions and referring expressions
# --------------------------------------------------------------------------------------------------


def _words(table: Mapping[str, tuple[str, ...]], value: str) -> tuple[str, ...]:
    return table.get(value, (value,))


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def _count_word(n: int) -> str:
    return _COUNT_WORDS[n] if 0 <= n < len(_COUNT_WORDS) else str(n)


def _position_phrase(position: str, rng: np.random.Generator | None = None) -> str:
    options = _POSITION_WORDS.get(position, (f"at the {position}",))
    return options[0] if rng is None else _pick(rng, options)


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:]


def _describe_object(obj: ShapeObject, rng: np.random.Generator, *, size: bool, fill: bool, position: bool) -> str:
    adjectives = []
    if size:
        adjectives.append(_pick(rng, _words(_SIZE_WORDS, obj.size)))
    if fill:
        adjectives.append(_pick(rng, _words(_FILL_WORDS, obj.fill)))
    pre: list[str] = []
    post: list[str] = []
    for word in adjectives:
        (pre if rng.random() < 0.7 else post).append(word)
    if len(pre) == 2 and rng.random() < 0.3:
        pre.reverse()
    head = " ".join([*pre, obj.color, _pick(rng, _words(_SHAPE_WORDS, obj.shape))])
    phrase = _with_article(head)
    if position:
        phrase += " " + _position_phrase(obj.position, rng)
    if post:
        connector = _pick(rng, ("that is", "which is", ","))
        tail = " and ".join(post)
        phrase = f"{phrase}, {tail}" if connector == "," else f"{phrase} {connector} {tail}"
    return phrase


def relations(a: ShapeObject, b: ShapeObject, config: ShapesConfig | None = None) -> list[str]:
    """The relations that hold for ``a`` relative to ``b`` ("left of", "right of", "above", "below")."""
    config = config or DEFAULT_CONFIG
    (ax, ay), (bx, by) = config.anchors[a.position], config.anchors[b.position]
    out = []
    if ax < bx - 1e-6:
        out.append("left of")
    elif ax > bx + 1e-6:
        out.append("right of")
    if ay < by - 1e-6:
        out.append("above")
    elif ay > by + 1e-6:
        out.append("below")
    return out


def caption_scene(scene: Scene, rng: np.random.Generator, config: ShapesConfig | None = None) -> str:
    """A varied caption: random template, synonyms, attribute and object order.

    Color and shape are always stated; size, fill and position are stated with the ``mention_*``
    probabilities of the config (decided once per caption).
    """
    config = config or DEFAULT_CONFIG
    size = bool(rng.random() < config.mention_size)
    fill = bool(rng.random() < config.mention_fill)
    position = bool(rng.random() < config.mention_position)
    order = [int(k) for k in rng.permutation(scene.count)]
    phrases = [_describe_object(scene.objects[k], rng, size=size, fill=fill, position=position) for k in order]
    if scene.count == 1:
        template = _pick(
            rng, ("{0}.", "there is {0}.", "a picture of {0}.", "one shape: {0}.", "an image showing {0}.")
        )
        return _sentence(template.format(phrases[0]))
    listing = _join(phrases)
    word = _count_word(scene.count)
    template = _pick(
        rng,
        (
            "{n} shapes: {l}.",
            "there are {n} objects: {l}.",
            "{l}.",
            "an image with {n} shapes, {l}.",
            "{n} shapes are shown: {l}.",
        ),
    )
    text = _sentence(template.format(n=word, l=listing))
    if rng.random() < config.relation_prob:
        i, j = (int(k) for k in rng.permutation(scene.count)[:2])
        a, b = scene.objects[i], scene.objects[j]
        relation = _pick(rng, relations(a, b, config))
        phrase = _pick(rng, _RELATION_WORDS[relation])
        text += " " + _sentence(f"the {a.color} {a.shape} is {phrase} the {b.color} {b.shape}.")
    return text


def _canonical_object(obj: ShapeObject, *, position: bool = True) -> str:
    phrase = _with_article(f"{obj.size} {obj.fill} {obj.color} {obj.shape}")
    return f"{phrase} {_position_phrase(obj.position)}" if position else phrase


def canonical_caption(scene: Scene) -> str:
    """One fixed, complete description of a scene (every attribute, canonical words)."""
    objects = sorted(scene.objects, key=lambda o: o.position)
    phrases = [_canonical_object(obj) for obj in objects]
    if scene.count == 1:
        return _sentence(phrases[0] + ".")
    return _sentence(f"{_count_word(scene.count)} shapes: {_join(phrases)}.")


def refer(scene: Scene, index: int, rng: np.random.Generator, *, exclude: Iterable[str] = ()) -> str:
    """A phrase (without article) that names object ``index`` uniquely and uses none of ``exclude``.

    ``exclude`` lists attributes the phrase must not reveal, e.g. ``{"color"}`` for "what color is the ...".
    """
    exclude = set(exclude)
    obj = scene.objects[index]
    others = [o for k, o in enumerate(scene.objects) if k != index]
    options: list[str] = []
    if not others:
        options.append("object")
        if "shape" not in exclude:
            options.append("shape")
    if "shape" not in exclude and all(o.shape != obj.shape for o in others):
        options.append(obj.shape)
    if "color" not in exclude and "shape" not in exclude:
        options.append(f"{obj.color} {obj.shape}")
    if "color" not in exclude and all(o.color != obj.color for o in others):
        options.append(f"{obj.color} {'object' if 'shape' in exclude else 'shape'}")
    if "position" not in exclude:
        options.append(f"{'object' if 'shape' in exclude else 'shape'} {_position_phrase(obj.position)}")
    if not options:
        raise ValueError(f"refer: no unique description of object {index} avoids {sorted(exclude)}")
    return _pick(rng, options)


# --------------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    """A question about a scene in three styles.

    ``question``/``answer`` is the short-answer form (one word or phrase), ``long_answer`` a full
    sentence, ``alternatives`` every accepted short answer (the canonical one first). For multiple
    choice, ``mc_question`` is asked with options drawn from ``mc_candidates``, which contains
    ``mc_answer`` and only values that are wrong for this scene.
    """

    kind: str
    question: str
    answer: str
    long_answer: str
    alternatives: tuple[str, ...]
    mc_question: str
    mc_answer: str
    mc_candidates: tuple[str, ...]


def _attribute_qa(scene: Scene, kind: str, rng: np.random.Generator, config: ShapesConfig) -> QA:
    index = int(rng.integers(scene.count))
    obj = scene.objects[index]
    ref = refer(scene, index, rng, exclude={kind})
    value = obj.attribute(kind)
    if kind == "color":
        question = _pick(
            rng, ("What color is the {r}?", "What is the color of the {r}?", "Which color does the {r} have?")
        )
        long_answer = f"The {ref} is {value}."
        alternatives: tuple[str, ...] = (value,)
    elif kind == "shape":
        question = _pick(rng, ("What shape is the {r}?", "Which shape is the {r}?", "What kind of shape is the {r}?"))
        long_answer = f"The {ref} is {_with_article(value)}."
        alternatives = _words(_SHAPE_WORDS, value)
    elif kind == "size":
        question = _pick(rng, ("Is the {r} small or large?", "What size is the {r}, small or large?"))
        long_answer = f"The {ref} is {value}."
        alternatives = _words(_SIZE_WORDS, value)
    elif kind == "fill":
        question = _pick(rng, ("Is the {r} filled or outlined?", "Is the {r} drawn filled or only as an outline?"))
        long_answer = (
            f"The {ref} is filled with color."
            if value == "filled"
            else f"The {ref} is outlined: only its border is drawn."
        )
        alternatives = _words(_FILL_WORDS, value)
    else:  # position
        question = _pick(
            rng, ("Where is the {r}?", "In which part of the image is the {r}?", "Where is the {r} located?")
        )
        long_answer = f"The {ref} is {_position_phrase(value)}."
        alternatives = _words(_POSITION_ANSWERS, value)
    question = question.format(r=ref)
    return QA(
        kind=kind,
        question=question,
        answer=value,
        long_answer=long_answer,
        alternatives=alternatives,
        mc_question=question,
        mc_answer=value,
        mc_candidates=config.values(kind),
    )


def make_qa(scene: Scene, kind: str, rng: np.random.Generator, config: ShapesConfig | None = None) -> QA:
    """A question of ``kind`` (one of :data:`QA_KINDS`) that the image answers."""
    config = config or DEFAULT_CONFIG
    if kind in ("color", "shape", "size", "fill", "position"):
        return _attribute_qa(scene, kind, rng, config)
    if kind == "count":
        n = scene.count
        question = _pick(
            rng,
            (
                "How many shapes are there in the image?",
                "How many objects can you see?",
                "How many shapes are in the picture?",
            ),
        )
        noun = "shape" if n == 1 else "shapes"
        return QA(
            kind=kind,
            question=question,
            answer=str(n),
            long_answer=f"There {'is' if n == 1 else 'are'} {_count_word(n)} {noun} in the image.",
            alternatives=(str(n), _count_word(n)),
            mc_question=question,
            mc_answer=str(n),
            mc_candidates=tuple(str(k) for k in range(1, config.max_count + 2)),
        )
    if kind == "relation":
        if scene.count < 2:
            raise ValueError("make_qa: a relation question needs a scene with at least two objects")
        i, j = (int(k) for k in rng.permutation(scene.count)[:2])
        a, b = scene.objects[i], scene.objects[j]
        ra, rb = refer(scene, i, rng, exclude={"position"}), refer(scene, j, rng, exclude={"position"})
        true = relations(a, b, config)
        truth = bool(rng.random() < 0.5)
        asked = _pick(rng, true) if truth else _OPPOSITE_RELATION[_pick(rng, true)]
        phrase = _pick(rng, _RELATION_WORDS[asked])
        actual = _RELATION_WORDS[true[0]][0]
        long_answer = (
            f"Yes, the {ra} is {phrase} the {rb}."
            if truth
            else f"No, the {ra} is not {phrase} the {rb}; it is {actual} it."
        )
        mc_answer = _pick(rng, true)
        return QA(
            kind=kind,
            question=f"Is the {ra} {phrase} the {rb}?",
            answer="yes" if truth else "no",
            long_answer=long_answer,
            alternatives=("yes" if truth else "no",),
            mc_question=f"Where is the {ra} relative to the {rb}?",
            mc_answer=mc_answer,
            mc_candidates=(mc_answer, *[r for r in _RELATION_WORDS if r not in true]),
        )
    if kind == "existence":
        present = {(o.color, o.shape) for o in scene.objects}
        absent = [(c, s) for c in config.color_names for s in config.shapes if (c, s) not in present]
        truth = bool(rng.random() < 0.5) or not absent
        index = int(rng.integers(scene.count))
        color, shape = (scene.objects[index].color, scene.objects[index].shape) if truth else _pick(rng, absent)
        where = _position_phrase(scene.objects[index].position)
        long_answer = (
            f"Yes, there is {_with_article(color + ' ' + shape)} {where}."
            if truth
            else f"No, there is no {color} {shape} in the image."
        )
        shown = scene.objects[int(rng.integers(scene.count))]
        mc_answer = f"{shown.color} {shown.shape}"
        return QA(
            kind=kind,
            question=f"Is there {_with_article(color + ' ' + shape)} in the image?",
            answer="yes" if truth else "no",
            long_answer=long_answer,
            alternatives=("yes" if truth else "no",),
            mc_question="Which of these shapes appears in the image?",
            mc_answer=mc_answer,
            mc_candidates=(mc_answer, *[f"{c} {s}" for c, s in absent]),
        )
    raise ValueError(f"make_qa: unknown kind {kind!r}; expected one of {list(QA_KINDS)}")


def _mc_options(qa: QA, rng: np.random.Generator, max_options: int = 4) -> tuple[list[str], str]:
    """Options (answer plus shuffled distractors) and the letter of the answer."""
    distractors = [c for c in qa.mc_candidates if c != qa.mc_answer]
    chosen = [distractors[int(k)] for k in rng.permutation(len(distractors))[: max_options - 1]]
    options = [*chosen, qa.mc_answer]
    options = [options[int(k)] for k in rng.permutation(len(options))]
    return options, "ABCDE"[options.index(qa.mc_answer)]


def _mc_prompt(question: str, options: Sequence[str]) -> str:
    lines = [f"{letter}. {option}" for letter, option in zip("ABCDE", options)]
    return "\n".join([question, *lines, MC_ANSWER_PROMPT])


def _available_kinds(scene: Scene, kinds: Sequence[str]) -> list[str]:
    return [k for k in kinds if k != "relation" or scene.count >= 2]


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


@dataclass
class WriteResult:
    """What a writer produced: named files (absolute paths), folders it owns, and item counts."""

    files: dict[str, Path] = field(default_factory=dict)
    dirs: list[Path] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def update(self, other: WriteResult) -> None:
        self.files.update(other.files)
        self.dirs.extend(other.dirs)
        self.counts.update(other.counts)


def _check_positive(name: str, value: Any) -> int:
    if not (_is_int(value) and value > 0):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if not (_is_int(seed) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _progress(iterable: Iterable[Any], desc: str, total: int, enabled: bool) -> Iterable[Any]:
    return tqdm(iterable, desc=f"shapes: {desc}", total=total, disable=not enabled, leave=False)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def _write_json(path: Path, obj: Any, *, indent: int | None = 1) -> None:
    _write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    _write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _save_image(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _setup(seed: int, image_size: int, config: ShapesConfig | None) -> tuple[int, int, ShapesConfig]:
    return _check_seed(seed), _check_image_size(image_size), config or DEFAULT_CONFIG


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


def mmbench_prompt(question: str, options: Sequence[str], hint: str | None = None) -> str:
    """The prompt lmms-eval's ``mmbench_doc_to_text`` renders for an MMBench row with the task's post prompt
    ``"\\n" + MC_ANSWER_PROMPT`` (doc_to_text joins it with another newline, hence the blank line)."""
    lines = [f"{letter}. {option}" for letter, option in zip("ABCDE", options)]
    body = f"{question} " + "\n".join([MMBENCH_OPTIONS_HEADER, *lines])
    if hint is not None:
        body = f"{hint} {body}"
    return f"{body}\n\n{MC_ANSWER_PROMPT}"


MMBENCH_ANSWER_STYLES: tuple[str, ...] = ("letter", "text-letter", "text")


def mmbench_target(letter: str, option: str, style: str = "letter") -> str:
    """The assistant's answer to an MMBench-format turn: ``"letter"`` the option's letter (``"B"``, as
    LLaVA-1.5's multiple-choice data), ``"text-letter"`` the option's text then its letter (``"red (B)"``),
    ``"text"`` the option's text alone (``"red"``). MMBench's rule-based matcher reads the letter of the
    first two (``can_infer_option``) and maps a unique option text in the third (``can_infer_text``)."""
    _check_mmbench_answer(style)
    if style == "letter":
        return letter
    return f"{option} ({letter})" if style == "text-letter" else option


def _check_mmbench_answer(style: str) -> None:
    if style not in MMBENCH_ANSWER_STYLES:
        raise ValueError(f"mmbench_answer must be one of {list(MMBENCH_ANSWER_STYLES)}, got {style!r}")


def vizwiz_prompt(question: str) -> str:
    """The prompt lmms-eval's ``vizwiz_vqa_doc_to_text`` renders for a VizWiz row (with the local post prompt)."""
    return f"{question.capitalize()}{VIZWIZ_POST_PROMPT}"


def _unanswerable_question(scene: Scene, rng: np.random.Generator, config: ShapesConfig) -> str:
    """A question the image cannot answer, in VizWiz row form (lower-case first letter): either one of
    ``write_vizwiz``'s unanswerable templates about a shape in the scene, or about a shape that is absent."""
    absent = [s for s in config.shapes if all(o.shape != s for o in scene.objects)]
    if absent and rng.random() < 0.4:
        shape = _pick(rng, absent)
        return _pick(
            rng, ("what color is the {s}?", "where is the {s}?", "is the {s} filled or outlined?", "how big is the {s}?")
        ).format(s=shape)
    ref = refer(scene, int(rng.integers(scene.count)), rng)
    return _pick(rng, _UNANSWERABLE_QUESTIONS).format(r=ref)


def _format_turn(
    qa: QA,
    style: str,
    rng: np.random.Generator,
    *,
    scene: Scene | None = None,
    config: ShapesConfig | None = None,
    hint_fraction: float = 0.4,
    unanswerable_fraction: float = 0.15,
    mmbench_answer: str = "letter",
) -> tuple[str, str]:
    if style == "short":
        return f"{qa.question}\n{SHORT_ANSWER_PROMPT}", qa.answer
    if style == "mc":
        options, letter = _mc_options(qa, rng)
        return _mc_prompt(qa.mc_question, options), letter
    if style == "mmbench":  # as lmms-eval renders an MMBench row (write_mmbench)
        options, letter = _mc_options(qa, rng)
        hint = _HINTS.get(qa.kind) if rng.random() < hint_fraction else None
        return mmbench_prompt(qa.mc_question, options, hint), mmbench_target(letter, qa.mc_answer, mmbench_answer)
    if style == "vizwiz":  # as lmms-eval renders a VizWiz row (write_vizwiz), some of them unanswerable
        if scene is not None and config is not None and rng.random() < unanswerable_fraction:
            return vizwiz_prompt(_unanswerable_question(scene, rng, config)), "unanswerable"
        return vizwiz_prompt(qa.question[:1].lower() + qa.question[1:]), qa.answer
    return qa.question, qa.long_answer


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


_OPPOSITES: Mapping[str, str] = MappingProxyType(
    {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "small": "large", "large": "small",
     "filled": "outlined", "above": "below", "below": "above"}
)  # fmt: skip


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
    of them unanswerable from the image; ``<image>`` only in the first human turn), plus ``max(1, round(n * text_only_fraction))`` text-only
    samples (none when the fraction is 0), shuffled together deterministically. ``mmbench_answer`` picks the
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


def _write_parquet(path: Path, rows: list[dict[str, Any]], features: Any) -> None:
    """Write rows with ``datasets`` feature metadata, as Hugging Face image datasets are stored."""
    import datasets  # local import: keeps ``import clipmoe_vlm`` light
    import pyarrow.parquet as pq

    table = datasets.Dataset.from_list(rows, features=features).data.table
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), compression="snappy")


def _image_cell(data: bytes, name: str) -> dict[str, Any]:
    return {"bytes": data, "path": name}


_HINTS: Mapping[str, str] = MappingProxyType(
    {
        "color": "Each shape is drawn in a single color on a dark background.",
        "shape": "Every object in the image is one simple geometric shape.",
        "size": "Shapes come in two sizes, small and large.",
        "fill": "A filled shape is colored in; an outlined shape shows only its border.",
        "position": "Positions refer to the left, right, top, bottom or center of the image.",
        "count": "Count every shape in the image, whatever its color.",
        "relation": "Relations such as 'left of' or 'above' compare where two shapes are in the image.",
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
    import datasets

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
    string = datasets.Value("string")
    features = datasets.Features(
        {
            "index": datasets.Value("int64"),
            "question": string,
            "hint": string,
            "A": string,
            "B": string,
            "C": string,
            "D": string,
            "answer": string,
            "category": string,
            "image": datasets.Image(),
            "source": string,
            "L2-category": string,
            "comment": string,
            "split": string,
        }
    )
    _write_parquet(path, rows, features)
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


_UNANSWERABLE_QUESTIONS: tuple[str, ...] = (
    "what does the text on the {r} say?",
    "what brand made the {r}?",
    "what is the name of the {r}?",
    "how much does the {r} cost?",
    "what time is shown on the {r}?",
)


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
    import datasets

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
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.List(datasets.Value("string")),
            "category": datasets.Value("string"),
        }
    )
    _write_parquet(path, rows, features)
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
    import datasets

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
    string = datasets.Value("string")
    features = datasets.Features(
        {
            "question_id": string,
            "image": datasets.Image(),
            "question": string,
            "answer": string,
            "image_source": string,
            "capability": string,
        }
    )
    _write_parquet(path, rows, features)
    return WriteResult(files={"mmvet": path}, counts={"mmvet": n})


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
        _write_json(out / attribute / "templates.json", list(_ZEROSHOT_TEMPLATES[attribute]))
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


# --------------------------------------------------------------------------------------------------
# The whole world
# --------------------------------------------------------------------------------------------------

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
    n_train: int = 4000,
    n_pretrain: int = 2000,
    n_instruct: int = 2000,
    n_eval: int = 300,
    n_mmvet: int = 100,
    n_retrieval: int = 300,
    n_zeroshot_per_class: int = 20,
    n_mmvp_pairs: int = 15,
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
