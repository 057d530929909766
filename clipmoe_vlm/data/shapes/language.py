"""Words for scenes: varied captions for training, one canonical caption, and referring expressions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

import numpy as np

from .world import DEFAULT_CONFIG, Scene, ShapeObject, ShapesConfig, _pick

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
