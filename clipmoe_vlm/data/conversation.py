"""Conversation templates for LLaVA-1.5 training and inference.

A template turns a list of :class:`Turn` objects into text. It renders the
text as a list of :class:`Segment` objects, each marked as supervised (an
assistant answer, which the loss trains on) or not (system prompt, user turns,
role tags, the image placeholder). The dataset tokenises these segments to
build labels, so no template-specific length arithmetic is needed anywhere.

Two styles are implemented, matching LLaVA-1.5:

* ``plain`` (stage-1 projector pretraining): the user turn is reduced to the
  image placeholder and the caption follows, ending with ``"\\n"``::

      <image>a red circle\\n

* ``two`` (``vicuna_v1``, stage-2 instruction tuning)::

      {system} USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>

Templates are frozen dataclasses held in a read-only registry, so nothing here
is mutable module state. Pick one with :func:`get_template` and pass it around.
"""

from __future__ import annotations

import enum
import json
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "DEFAULT_IMAGE_TOKEN",
    "TEMPLATES",
    "ConversationTemplate",
    "Segment",
    "SeparatorStyle",
    "Turn",
    "get_template",
    "parse_llava_conversation",
]

DEFAULT_IMAGE_TOKEN = "<image>"

Role = Literal["human", "gpt"]

# Role spellings found in LLaVA-style JSON and in chat "messages"; mapped to the two roles used here.
_ROLE_ALIASES: Mapping[str, Role] = types.MappingProxyType(
    {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
)


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: ``role`` is ``"human"`` (user) or ``"gpt"`` (assistant)."""

    role: Role
    text: str


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text. ``supervised`` pieces receive labels; the rest are -100."""

    text: str
    supervised: bool


class SeparatorStyle(str, enum.Enum):
    """How turns are joined (names follow LLaVA's ``SeparatorStyle``)."""

    PLAIN = "plain"
    TWO = "two"


def parse_llava_conversation(conversations: Sequence[Mapping[str, Any]]) -> list[Turn]:
    """Convert LLaVA JSON ``conversations`` into alternating :class:`Turn` objects.

    Leading assistant turns are dropped, as LLaVA's preprocessing does. The rest
    must alternate human/gpt, starting with human.

    Raises:
        ValueError: if an entry lacks ``from``/``value``, a role is unknown, the
            roles do not alternate, or no human turn is left.
    """
    turns: list[Turn] = []
    for position, message in enumerate(conversations):
        if not isinstance(message, Mapping):
            raise ValueError(  # noqa: TRY004  (malformed data is a ValueError throughout)
                f"conversations[{position}] is {type(message).__name__}, expected an object"
            )
        role_name, text = message.get("from"), message.get("value")
        if not isinstance(role_name, str) or role_name.lower() not in _ROLE_ALIASES:
            raise ValueError(
                f"conversations[{position}]['from'] is {role_name!r}; expected one of {sorted(_ROLE_ALIASES)}"
            )
        if not isinstance(text, str):
            raise ValueError(  # noqa: TRY004
                f"conversations[{position}]['value'] is {type(text).__name__}, expected a string"
            )
        turns.append(Turn(_ROLE_ALIASES[role_name.lower()], text))

    while turns and turns[0].role != "human":
        turns.pop(0)
    if not turns:
        raise ValueError("conversation has no human turn")
    for position, turn in enumerate(turns):
        expected: Role = "human" if position % 2 == 0 else "gpt"
        if turn.role != expected:
            raise ValueError(f"turn {position} is from {turn.role!r}, expected {expected!r} (roles must alternate)")
    return turns


@dataclass(frozen=True)
class ConversationTemplate:
    """A LLaVA conversation format.

    Attributes:
        name: registry name.
        style: :class:`SeparatorStyle`.
        system: system prompt (``two`` style only).
        roles: the user and assistant role tags (``two`` style only).
        sep: separator after the system prompt and after each user turn
            (``two``), or after each answer (``plain``).
        sep2: separator after each assistant answer (``two`` style; ``"</s>"``).
        image_token: the image placeholder string.
    """

    name: str
    style: SeparatorStyle
    system: str = ""
    roles: tuple[str, str] = ("", "")
    sep: str = "\n"
    sep2: str | None = None
    image_token: str = DEFAULT_IMAGE_TOKEN

    def __post_init__(self) -> None:
        if self.style is SeparatorStyle.TWO and self.sep2 is None:
            raise ValueError(f"template {self.name!r}: the 'two' style needs sep2")

    # ------------------------------------------------------------------ training text
    def segments(self, turns: Sequence[Turn]) -> list[Segment]:
        """Render a complete conversation (ending with an answer) as segments.

        ``two`` style: the last supervised segment of each round is
        ``" " + answer + sep2``, so the answer and its ``</s>`` are trained on,
        as in LLaVA. A trailing user turn without an answer is an error (it
        would carry no supervision); drop it before calling.

        ``plain`` style: exactly one user turn and one answer. The user text is
        replaced by the image placeholder (or by nothing for a text-only turn),
        and ``answer + sep`` is supervised.

        Raises:
            ValueError: if the turns do not fit the style.
        """
        _check_alternation(turns)
        if not turns or turns[-1].role != "gpt":
            raise ValueError(f"template {self.name!r}: a training conversation must end with an assistant turn")
        if self.style is SeparatorStyle.PLAIN:
            if len(turns) != 2:
                raise ValueError(
                    f"template {self.name!r} expects exactly one user turn and one answer, got {len(turns)} turns"
                )
            prompt = self.image_token if self.image_token in turns[0].text else ""
            return [Segment(prompt, False), Segment(turns[1].text + self.sep, True)]

        assert self.sep2 is not None  # checked in __post_init__
        user_role, assistant_role = self.roles
        result: list[Segment] = []
        prefix = self.system + self.sep
        for question, answer in zip(turns[0::2], turns[1::2]):
            prefix += f"{user_role}: {question.text}{self.sep}{assistant_role}:"
            result.append(Segment(prefix, False))
            result.append(Segment(f" {answer.text}{self.sep2}", True))
            prefix = ""
        return result

    def render(self, turns: Sequence[Turn]) -> str:
        """The full training text of a conversation (the segments joined)."""
        return "".join(segment.text for segment in self.segments(turns))

    # ------------------------------------------------------------------ inference text
    def generation_prompt(self, turns: Sequence[Turn]) -> str:
        """Render a conversation that ends with a user turn as a prompt for generation.

        ``two`` style: ``"{system} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"``.
        ``plain`` style: the image placeholder (the model continues with a caption).
        The text carries no BOS; tokenise it with ``add_special_tokens=True``.

        Raises:
            ValueError: if the last turn is not a user turn or roles do not alternate.
        """
        _check_alternation(turns)
        if not turns or turns[-1].role != "human":
            raise ValueError(f"template {self.name!r}: a generation prompt must end with a user turn")
        if self.style is SeparatorStyle.PLAIN:
            return self.image_token if self.image_token in turns[-1].text else ""
        history = self.render(turns[:-1]) if len(turns) > 1 else self.system + self.sep
        user_role, assistant_role = self.roles
        return f"{history}{user_role}: {turns[-1].text}{self.sep}{assistant_role}:"

    # ------------------------------------------------------------------ Jinja chat template
    def chat_template(self) -> str:
        """A Jinja chat template that renders HF ``messages`` like :meth:`generation_prompt`.

        Set it as ``tokenizer.chat_template`` / ``processor.chat_template`` so that
        ``apply_chat_template(messages, add_generation_prompt=True)`` produces
        ``bos_token + template.generation_prompt(turns)``. Messages use the roles
        ``system`` (``two`` style: replaces the default system prompt), ``user``
        and ``assistant``; ``content`` is a string or a list of parts
        (``{"type": "image"}`` / ``{"type": "text", "text": ...}``). Image parts
        render as ``"<image>\\n"`` before the turn's text (where LLaVA puts it),
        and several text parts are joined with ``"\\n"``. Assistant text is wrapped
        in ``{% generation %}`` so ``return_assistant_tokens_mask`` works.
        """
        image = _jinja_literal(self.image_token)
        # Sets `text` to the message's text, images first (as "<image>\n" for `two`, "<image>" for `plain`).
        image_prefix = image if self.style is SeparatorStyle.PLAIN else _jinja_literal(self.image_token + "\n")
        content = (
            "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
            "{%- else -%}"
            "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
            "{%- set texts = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
            "| list -%}"
            f"{{%- set text = ({image_prefix} * (images | length)) + (texts | join('\\n')) -%}}"
            "{%- endif -%}"
        )
        if self.style is SeparatorStyle.PLAIN:
            sep = _jinja_literal(self.sep)
            return (
                "{{- bos_token -}}"
                "{%- for message in messages -%}"
                + content
                + "{%- if message['role'] == 'user' -%}"
                f"{{%- if {image} in text -%}}{{{{- {image} -}}}}{{%- endif -%}}"
                "{%- elif message['role'] == 'assistant' -%}"
                f"{{%- generation -%}}{{{{- text + {sep} -}}}}{{%- endgeneration -%}}"
                "{%- endif -%}"
                "{%- endfor -%}"
            )
        assert self.sep2 is not None
        user_role, assistant_role = self.roles
        sep, sep2 = _jinja_literal(self.sep), _jinja_literal(self.sep2)
        user_tag, assistant_tag = _jinja_literal(user_role + ": "), _jinja_literal(assistant_role + ":")
        return (
            "{{- bos_token -}}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set message = messages[0] -%}" + content + "{%- set system = text -%}"
            "{%- set loop_messages = messages[1:] -%}"
            "{%- else -%}"
            f"{{%- set system = {_jinja_literal(self.system)} -%}}"
            "{%- set loop_messages = messages -%}"
            "{%- endif -%}"
            f"{{{{- system + {sep} -}}}}"
            "{%- for message in loop_messages -%}" + content + "{%- if message['role'] == 'user' -%}"
            f"{{{{- {user_tag} + text + {sep} + {assistant_tag} -}}}}"
            "{%- elif message['role'] == 'assistant' -%}"
            f"{{%- generation -%}}{{{{- ' ' + text + {sep2} -}}}}{{%- endgeneration -%}}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )


def _check_alternation(turns: Sequence[Turn]) -> None:
    for position, turn in enumerate(turns):
        expected: Role = "human" if position % 2 == 0 else "gpt"
        if turn.role != expected:
            raise ValueError(f"turn {position} is from {turn.role!r}, expected {expected!r} (roles must alternate)")


def _jinja_literal(text: str) -> str:
    """A Jinja string literal for ``text`` (Jinja string escapes follow JSON's for these characters)."""
    return json.dumps(text)


_PLAIN = ConversationTemplate(name="plain", style=SeparatorStyle.PLAIN, sep="\n")

# LLaVA-1.5's `conv_vicuna_v1` (`--version v1` in training, `--conv-mode vicuna_v1` in its eval scripts).
_VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    style=SeparatorStyle.TWO,
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)

# LLaVA's `conv_llava_v1`: identical to vicuna_v1 except for the system prompt's wording ("human").
_LLAVA_V1 = ConversationTemplate(
    name="llava_v1",
    style=SeparatorStyle.TWO,
    system=(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)

TEMPLATES: Mapping[str, ConversationTemplate] = types.MappingProxyType(
    {"plain": _PLAIN, "vicuna_v1": _VICUNA_V1, "v1": _VICUNA_V1, "llava_v1": _LLAVA_V1}
)
"""Read-only registry of templates. ``v1`` is an alias of ``vicuna_v1`` (LLaVA's ``--version v1``)."""


def get_template(name: str) -> ConversationTemplate:
    """Look up a template by name.

    Raises:
        ValueError: if ``name`` is unknown; the message lists the valid names.
    """
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; valid names: {sorted(TEMPLATES)}") from None
