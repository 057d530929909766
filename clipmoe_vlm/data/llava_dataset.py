"""LLaVA-1.5 supervised data for transformers' ``LlavaForConditionalGeneration``: the dataset.

* :class:`LlavaDataset` loads and preprocesses one sample at a time: image
  placeholder checks, expansion of ``<image>`` into ``num_image_tokens`` real
  token ids (transformers' LLaVA scatters one image feature into each), safe
  truncation, image loading and padding to square.

The other jobs live in their own modules: records (:mod:`.llava_records`),
tokenisation and label masking (:mod:`.llava_tokenize`), images
(:mod:`.llava_images`), the :class:`DataStats` counters (:mod:`.llava_stats`),
collator and sampler (:mod:`.llava_batching`).

Skipped samples. When a sample cannot be used (missing or corrupt image, too
long under the ``"skip"`` policy, malformed conversation, tokenisation
mismatch under ``on_mismatch="skip"``), ``dataset[i]`` counts the reason in
:attr:`LlavaDataset.stats` and returns the next usable sample *of the same
modality* (``i+1``, ``i+2``, ... wrapping around). Batches therefore keep their
size and the sampler's modality grouping, and the substitution is
deterministic. A run of ``max_attempts`` unusable samples raises.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from clipmoe_vlm.data.conversation import ConversationTemplate, Turn, get_template, parse_llava_conversation
from clipmoe_vlm.data.llava_images import (
    UNREADABLE_IMAGE_ERRORS,
    open_rgb,
    pad_colour,
    preprocess_image,
)
from clipmoe_vlm.data.llava_records import load_llava_records, validate_record
from clipmoe_vlm.data.llava_stats import DataStats
from clipmoe_vlm.data.llava_tokenize import IGNORE_INDEX, tokenize_conversation

__all__ = ["LlavaDataset"]

TruncationPolicy = Literal["truncate", "skip"]
MismatchPolicy = Literal["skip", "mask", "raise"]
AspectRatio = Literal["pad", "square"]


class _SkipSample(Exception):
    """Raised inside the dataset when a sample is unusable; ``reason`` names a ``skipped.*`` counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class LlavaDataset(Dataset[dict[str, torch.Tensor]]):
    """LLaVA-1.5 supervised dataset producing inputs for ``LlavaForConditionalGeneration``.

    Each item is a dict with ``input_ids`` and ``labels`` (1-D ``int64``) and,
    for image samples only, ``pixel_values`` (``3 x H x W``). Text-only samples
    (no ``"image"`` key) have no image tokens and no ``pixel_values``.

    Processing of one sample:

    1. ``conversations`` is parsed (leading assistant turns dropped, roles must
       alternate); an unanswered final user turn is dropped and counted.
    2. Image placeholder: an image sample must contain exactly one ``<image>``,
       in a user turn; it is moved to the start of its turn as ``"<image>\\n"``
       (as LLaVA does). If it is missing, it is prepended to the first user
       turn and counted as ``image_placeholder_added`` (``strict=True``: raise).
       More than one, or ``<image>`` in an answer or in a text-only sample, is
       skipped as ``bad_image_placeholder`` (``strict=True``: raise).
    3. The template renders segments, :func:`tokenize_conversation` tokenises
       them; a mismatch is counted and handled by ``on_mismatch``: ``"skip"``
       (default), ``"mask"`` (LLaVA's behaviour: all labels -100) or ``"raise"``.
    4. The single ``<image>`` id is expanded to ``num_image_tokens`` copies
       (labels -100).
    5. Longer than ``model_max_length``: ``truncation="truncate"`` cuts text
       after the image block (counted as ``truncated``); if that would cut the
       image block or leave no supervised token, or if ``truncation="skip"``,
       the sample is skipped as ``too_long``. The image-token count is checked
       after truncation.
    6. The image is opened with PIL, converted to RGB, padded to square with
       the processor's mean colour (``image_aspect_ratio="pad"``) and run
       through ``image_processor``. Missing and unreadable files are skipped
       as ``missing_image`` / ``corrupt_image`` (also with ``strict=True``).

    Args:
        data: path to LLaVA JSON / JSONL, or the list of records itself.
        tokenizer: tokenizer with the image placeholder as one special token.
        template: a :class:`ConversationTemplate` or its registry name.
        num_image_tokens: image features per image, i.e. the tower's patch
            count, e.g. ``(image_size // patch_size) ** 2`` for
            ``vision_feature_select_strategy="default"`` (576 for CLIP-L/336).
        image_root: folder that ``"image"`` paths are relative to; required
            when any sample has an image.
        image_processor: e.g. ``CLIPImageProcessor``; required when any sample
            has an image.
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5) or ``"square"`` (the
            processor's own resize and crop).
        model_max_length: maximum sequence length including image tokens;
            defaults to ``tokenizer.model_max_length``.
        truncation: ``"truncate"`` or ``"skip"`` for over-long samples.
        on_mismatch: ``"skip"``, ``"mask"`` or ``"raise"``.
        strict: raise on conversation-format problems instead of repairing or
            skipping them.
        max_attempts: how many consecutive unusable samples ``dataset[i]``
            tolerates before raising.
        stats: counters to use; a fresh :class:`DataStats` by default.

    Raises:
        FileNotFoundError: the data file or ``image_root`` does not exist.
        ValueError: unparsable data, a malformed record (naming its index and
            key), a missing ``image_root`` / ``image_processor`` while samples
            have images, or a tokenizer without the image token.
    """

    def __init__(
        self,
        data: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        template: ConversationTemplate | str,
        *,
        num_image_tokens: int,
        image_root: str | os.PathLike[str] | None = None,
        image_processor: BaseImageProcessor | None = None,
        image_aspect_ratio: AspectRatio = "pad",
        model_max_length: int | None = None,
        truncation: TruncationPolicy = "truncate",
        on_mismatch: MismatchPolicy = "skip",
        strict: bool = False,
        max_attempts: int = 32,
        stats: DataStats | None = None,
    ) -> None:
        if isinstance(data, (str, os.PathLike)):
            self.source = str(data)
            records: Sequence[Mapping[str, Any]] = load_llava_records(data)
        else:
            self.source = "<records>"
            records = data
        for position, record in enumerate(records):
            validate_record(record, f"{self.source}: record {position}")
        self.records = records
        self.template = get_template(template) if isinstance(template, str) else template
        self.tokenizer = tokenizer

        if truncation not in ("truncate", "skip"):
            raise ValueError(f"truncation must be 'truncate' or 'skip', got {truncation!r}")
        if on_mismatch not in ("skip", "mask", "raise"):
            raise ValueError(f"on_mismatch must be 'skip', 'mask' or 'raise', got {on_mismatch!r}")
        if image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.truncation: TruncationPolicy = truncation
        self.on_mismatch: MismatchPolicy = on_mismatch
        self.image_aspect_ratio: AspectRatio = image_aspect_ratio
        self.num_image_tokens = num_image_tokens
        self.strict = strict
        self.max_attempts = max_attempts
        self.stats = stats if stats is not None else DataStats()

        self.model_max_length = model_max_length if model_max_length is not None else tokenizer.model_max_length
        if self.model_max_length <= num_image_tokens + 1:
            raise ValueError(
                f"model_max_length={self.model_max_length} leaves no room for text after "
                f"num_image_tokens={num_image_tokens} image tokens"
            )
        self.image_token_id = self._resolve_image_token_id(tokenizer, self.template.image_token)

        self.has_image: list[bool] = [record.get("image") is not None for record in records]
        self.image_root = Path(image_root) if image_root is not None else None
        self.image_processor = image_processor
        self._background: tuple[int, ...] | None = None
        if any(self.has_image):
            if self.image_root is None:
                raise ValueError(f"{self.source}: samples have an 'image' key but no image_root was given")
            if not self.image_root.is_dir():
                raise FileNotFoundError(f"image_root is not a directory: {self.image_root}")
            if image_processor is None:
                raise ValueError(f"{self.source}: samples have an 'image' key but no image_processor was given")
            if image_aspect_ratio == "pad":
                self._background = pad_colour(image_processor)

        by_modality: dict[bool, list[int]] = {True: [], False: []}
        for position, flag in enumerate(self.has_image):
            by_modality[flag].append(position)
        self._by_modality = by_modality

    @staticmethod
    def _resolve_image_token_id(tokenizer: PreTrainedTokenizerBase, image_token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        encoded = tokenizer(image_token, add_special_tokens=False)["input_ids"]
        if token_id is None or token_id == tokenizer.unk_token_id or list(encoded) != [token_id]:
            raise ValueError(
                f"tokenizer does not map {image_token!r} to a single token id (got {list(encoded)}); "
                f"add it with tokenizer.add_special_tokens({{'extra_special_tokens': [{image_token!r}]}})"
            )
        return int(token_id)

    # ------------------------------------------------------------------ sizes for the sampler
    def __len__(self) -> int:
        return len(self.records)

    @cached_property
    def _word_counts(self) -> list[int]:
        return [
            sum(
                len(str(turn.get("value", "")).split()) for turn in record["conversations"] if isinstance(turn, Mapping)
            )
            for record in self.records
        ]

    @property
    def lengths(self) -> list[int]:
        """Approximate lengths: word count, plus ``num_image_tokens`` for image samples.

        LLaVA adds a fixed 128 for images; the real image-token count is used here.
        """
        return [
            words + (self.num_image_tokens if flag else 0) for words, flag in zip(self._word_counts, self.has_image)
        ]

    @property
    def modality_lengths(self) -> list[int]:
        """Word counts, positive for image samples and negative for text-only ones (LLaVA's convention).

        Never 0: an empty sample counts as one word so that its sign still
        carries its modality.
        """
        return [max(words, 1) * (1 if flag else -1) for words, flag in zip(self._word_counts, self.has_image)]

    # ------------------------------------------------------------------ items
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        reasons: list[str] = []
        for candidate in self._candidates(index):
            try:
                sample = self._build(candidate)
            except _SkipSample as skip:
                self.stats.add(f"skipped.{skip.reason}")
                reasons.append(f"{candidate}: {skip}")
                continue
            self.stats.add("samples")
            return sample
        raise RuntimeError(
            f"{self.source}: {len(reasons)} consecutive unusable samples starting at index {index}: {reasons}"
        )

    def _candidates(self, index: int) -> Iterator[int]:
        """``index``, then the following indices with the same modality, wrapping around."""
        same = self._by_modality[self.has_image[index]]
        start = bisect.bisect_left(same, index)
        for step in range(min(self.max_attempts, len(same))):
            yield same[(start + step) % len(same)]

    def _describe(self, index: int) -> str:
        return f"{self.source}: record {index} (id={self.records[index].get('id')!r})"

    def _reject(self, index: int, reason: str, detail: str) -> _SkipSample:
        """The skip to raise for a format problem; in strict mode, raise a ValueError naming the sample instead."""
        if self.strict:
            raise ValueError(f"{self._describe(index)}: {detail}")
        return _SkipSample(reason, detail)

    def _build(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        has_image = self.has_image[index]
        try:
            turns = parse_llava_conversation(record["conversations"])
        except ValueError as error:
            raise self._reject(index, "bad_conversation", str(error)) from error
        if turns[-1].role == "human":
            turns = turns[:-1]
            self.stats.add("trailing_turn_dropped")
            if not turns:
                raise self._reject(index, "bad_conversation", "no answered user turn")
        turns = self._place_image_token(index, turns, has_image)

        try:
            segments = self.template.segments(turns)
        except ValueError as error:
            raise self._reject(index, "bad_conversation", str(error)) from error
        tokenized = tokenize_conversation(self.tokenizer, segments)
        input_ids, labels = tokenized.input_ids, tokenized.labels
        if tokenized.mismatch:
            self.stats.add("tokenization_mismatch")
            detail = "segment-wise token counts differ from the whole-sequence tokenisation"
            if self.on_mismatch == "raise":
                raise ValueError(f"{self._describe(index)}: {detail}")
            if self.on_mismatch == "skip":
                raise _SkipSample("tokenization_mismatch", detail)
            labels = [IGNORE_INDEX] * len(labels)

        positions = [position for position, token in enumerate(input_ids) if token == self.image_token_id]
        if len(positions) != (1 if has_image else 0):
            raise self._reject(index, "bad_image_placeholder", f"{len(positions)} image tokens after tokenisation")
        if has_image:
            (position,) = positions
            block = [self.image_token_id] * self.num_image_tokens
            input_ids = input_ids[:position] + block + input_ids[position + 1 :]
            labels = labels[:position] + [IGNORE_INDEX] * self.num_image_tokens + labels[position + 1 :]
            image_end = position + self.num_image_tokens
        else:
            image_end = 0

        if len(input_ids) > self.model_max_length:
            had_labels = any(label != IGNORE_INDEX for label in labels)
            if self.truncation == "skip":
                raise _SkipSample("too_long", f"{len(input_ids)} tokens > {self.model_max_length}")
            if image_end > self.model_max_length:
                raise _SkipSample("too_long", "truncation would cut the image tokens")
            input_ids, labels = input_ids[: self.model_max_length], labels[: self.model_max_length]
            if had_labels and all(label == IGNORE_INDEX for label in labels):
                raise _SkipSample("too_long", "no supervised token left after truncation")
            self.stats.add("truncated")
        image_tokens = sum(token == self.image_token_id for token in input_ids)
        if image_tokens != (self.num_image_tokens if has_image else 0):
            raise RuntimeError(f"{self._describe(index)}: {image_tokens} image tokens after truncation")

        sample = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if has_image:
            sample["pixel_values"] = self._load_pixels(str(record["image"]))
        return sample

    def _place_image_token(self, index: int, turns: list[Turn], has_image: bool) -> list[Turn]:
        image_token = self.template.image_token
        human_counts = [turn.text.count(image_token) if turn.role == "human" else 0 for turn in turns]
        in_answers = any(image_token in turn.text for turn in turns if turn.role == "gpt")
        total = sum(human_counts)
        if not has_image:
            if total or in_answers:
                raise self._reject(index, "bad_image_placeholder", f"{image_token!r} in a text-only sample")
            return turns
        if in_answers or total > 1:
            raise self._reject(
                index, "bad_image_placeholder", f"expected one {image_token!r} in the user turns, found {total}"
            )
        if total == 0:
            if self.strict:
                raise ValueError(f"{self._describe(index)}: image sample without {image_token!r} in its text")
            self.stats.add("image_placeholder_added")
            target = 0
        else:
            target = human_counts.index(1)
        text = turns[target].text.replace(image_token, "").strip()
        placed = Turn(turns[target].role, f"{image_token}\n{text}")
        return turns[:target] + [placed] + turns[target + 1 :]

    def _load_pixels(self, relative_path: str) -> torch.Tensor:
        assert self.image_root is not None and self.image_processor is not None  # checked in __init__
        path = self.image_root / relative_path
        if not path.is_file():
            raise _SkipSample("missing_image", str(path))
        try:
            image = open_rgb(path)
        except UNREADABLE_IMAGE_ERRORS as error:
            raise _SkipSample("corrupt_image", f"{path}: {error}") from error
        return preprocess_image(image, self.image_processor, self._background)

