"""Questions about a scene and the prompt formats they are asked in (LLaVA-1.5, and MMBench / VizWiz as
lmms-eval renders them, so training turns and benchmark rows match)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from .language import (
    _FILL_WORDS,
    _OPPOSITE_RELATION,
    _POSITION_ANSWERS,
    _RELATION_WORDS,
    _SHAPE_WORDS,
    _SIZE_WORDS,
    _count_word,
    _position_phrase,
    _with_article,
    _words,
    refer,
    relations,
)
from .world import DEFAULT_CONFIG, Scene, ShapesConfig, _pick

#: LLaVA-1.5 style answer-format prompts.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MC_ANSWER_PROMPT = "Answer with the option's letter from the given choices directly."
#: lmms-eval's MMBench option header (``metadata.sys_prompt`` of its ``mmbench.yaml``).
MMBENCH_OPTIONS_HEADER = "There are several options:"
#: lmms-eval's VizWiz-VQA post prompt (``lmms_eval_specific_kwargs.default.post_prompt``).
VIZWIZ_POST_PROMPT = "\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER_PROMPT

#: Question kinds understood by :func:`make_qa`.
QA_KINDS: tuple[str, ...] = ("color", "shape", "size", "fill", "position", "count", "relation", "existence")

# MMBench hints and VizWiz unanswerable templates: shared by the benchmark writers and the benchmark-format
# training turns (`_format_turn`), so training text and test rows read alike.
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
_UNANSWERABLE_QUESTIONS: tuple[str, ...] = (
    "what does the text on the {r} say?",
    "what brand made the {r}?",
    "what is the name of the {r}?",
    "how much does the {r} cost?",
    "what time is shown on the {r}?",
)


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
