"""The Shapes world's vocabulary, configuration, scene model and sampling.

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
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np

#: The name the single-module generator had: manifests written before the package split stay valid.
GENERATOR_NAME = "clipmoe_vlm.data.shapes"
#: Bump when the output for a given seed changes; it is part of the cache key in ``manifest.json``.
GENERATOR_VERSION = "1.3"

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 96

#: Attribute names, in the order used for zero-shot trees and MMVP-VLM categories.
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "fill", "position", "count")

RGB = tuple[int, int, int]


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


# Argument checks live here because the renderer and every writer validate the same way.


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_image_size(image_size: Any) -> int:
    if not (_is_int(image_size) and MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
        raise ValueError(f"image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}")
    return int(image_size)


def _check_positive(name: str, value: Any) -> int:
    if not (_is_int(value) and value > 0):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if not (_is_int(seed) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
