"""LLaVA-1.5 supervised data for transformers' ``LlavaForConditionalGeneration``.

Pieces:

* :func:`load_llava_records` reads LLaVA JSON (a list of samples) or JSONL.
* :func:`tokenize_conversation` tokenises template segments into ``input_ids``
  and ``labels`` (assistant segments supervised, everything else -100) and
  reports a tokenisation mismatch instead of hiding it.
* :class:`LlavaDataset` loads and preprocesses one sample at a time: image
  placeholder checks, expansion of ``<image>`` into ``num_image_tokens`` real
  token ids (transformers' LLaVA scatters one image feature into each), safe
  truncation, image loading and padding to square.
* :class:`DataStats` counts skipped, repaired, truncated and mismatched samples,
  including those seen in DataLoader worker processes.
* :class:`LlavaCollator` pads a list of samples into a model batch.
* :class:`ModalityLengthGroupedSampler` is LLaVA's ``group_by_modality_length``
  sampler, deterministic per seed and epoch, and shardable over ranks.

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
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, get_worker_info
from transformers import PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from clipmoe_vlm.data.conversation import ConversationTemplate, Segment, Turn, get_template, parse_llava_conversation

__all__ = [
    "IGNORE_INDEX",
    "DataStats",
    "LlavaCollator",
    "LlavaDataset",
    "ModalityLengthGroupedSampler",
    "TokenizedConversation",
    "expand_to_square",
    "load_llava_records",
    "tokenize_conversation",
]

IGNORE_INDEX = -100

TruncationPolicy = Literal["truncate", "skip"]
MismatchPolicy = Literal["skip", "mask", "raise"]
AspectRatio = Literal["pad", "square"]


class _SkipSample(Exception):
    """Raised inside the dataset when a sample is unusable; ``reason`` names a ``skipped.*`` counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --------------------------------------------------------------------------- statistics
class DataStats:
    """Counters for what the dataset did, readable from the main process.

    Counter names (all start at 0):

    * ``samples``: samples returned by ``dataset[i]``;
    * ``truncated``: samples returned with their text cut to ``model_max_length``;
    * ``image_placeholder_added``: image samples without ``<image>`` in the text,
      repaired by prepending it to the first user turn;
    * ``trailing_turn_dropped``: conversations ending with an unanswered user turn;
    * ``tokenization_mismatch``: samples whose segment-wise token counts disagree
      with the whole-sequence tokenisation (whatever ``on_mismatch`` then did);
    * ``skipped.<reason>``: samples replaced by another one, for ``reason`` in
      ``missing_image``, ``corrupt_image``, ``too_long``, ``tokenization_mismatch``,
      ``bad_conversation``, ``bad_image_placeholder``.

    DataLoader workers are separate processes, so the counts live in a
    shared-memory tensor with one row per process (row 0: the main process,
    row ``1 + worker_id``: a worker) and each process writes only its own row;
    :meth:`as_dict` sums the rows. Counts are per dataset object, i.e. per rank
    under DDP (all-reduce them to log a global figure). Two DataLoaders iterating
    the same dataset at the same time would share worker rows; give each its own
    dataset (and stats) if you need that.
    """

    SKIP_REASONS: tuple[str, ...] = (
        "missing_image",
        "corrupt_image",
        "too_long",
        "tokenization_mismatch",
        "bad_conversation",
        "bad_image_placeholder",
    )
    NAMES: tuple[str, ...] = (
        "samples",
        "truncated",
        "image_placeholder_added",
        "trailing_turn_dropped",
        "tokenization_mismatch",
    ) + tuple(f"skipped.{reason}" for reason in SKIP_REASONS)

    def __init__(self, max_workers: int = 128) -> None:
        if max_workers < 0:
            raise ValueError(f"max_workers must be >= 0, got {max_workers}")
        self._column = {name: position for position, name in enumerate(self.NAMES)}
        self._counts = torch.zeros((max_workers + 1, len(self.NAMES)), dtype=torch.int64).share_memory_()

    def add(self, name: str, count: int = 1) -> None:
        """Add ``count`` to counter ``name`` (in this process's row)."""
        if name not in self._column:
            raise ValueError(f"unknown counter {name!r}; valid names: {list(self.NAMES)}")
        worker = get_worker_info()
        rows = self._counts.shape[0]
        # Beyond max_workers, workers share rows and concurrent updates may be lost.
        row = 0 if worker is None or rows == 1 else 1 + worker.id % (rows - 1)
        self._counts[row, self._column[name]] += count

    def as_dict(self) -> dict[str, int]:
        """All counters, summed over processes."""
        totals = self._counts.sum(dim=0).tolist()
        return dict(zip(self.NAMES, totals))

    @property
    def skipped(self) -> int:
        """Total number of skipped samples, all reasons together."""
        counts = self.as_dict()
        return sum(counts[f"skipped.{reason}"] for reason in self.SKIP_REASONS)

    def reset(self) -> None:
        """Set every counter to zero."""
        self._counts.zero_()

    def __repr__(self) -> str:
        nonzero = {name: value for name, value in self.as_dict().items() if value}
        return f"DataStats({nonzero})"


# --------------------------------------------------------------------------- records
def load_llava_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read LLaVA data: a JSON list of samples, or JSONL (one sample per line, by ``.jsonl`` suffix).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file does not parse, or a JSON file is not a list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file not found: {path}")
    if path.suffix == ".jsonl":
        records: list[Any] = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {line_number} is not valid JSON: {error}") from error
        return records
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")  # noqa: TRY004
    return data


def _validate_record(record: Any, where: str) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")  # noqa: TRY004
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: key 'conversations' must be a non-empty list")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(
            f"{where}: key 'image' must be one relative path (a string), got {type(image).__name__}; "
            "several images per sample are not supported"
        )


# --------------------------------------------------------------------------- tokenisation
@dataclass(frozen=True)
class TokenizedConversation:
    """Result of :func:`tokenize_conversation`.

    ``mismatch`` is True when at least one segment boundary does not fall on a
    token boundary of the whole-sequence tokenisation; ``labels`` are then not
    trustworthy and the caller must mask, skip or raise.
    """

    input_ids: list[int]
    labels: list[int]
    mismatch: bool


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, segments: Sequence[Segment]) -> TokenizedConversation:
    """Tokenise rendered segments into ``input_ids`` and ``labels``.

    ``input_ids`` are the tokenisation of the whole text (the same ids that
    tokenising the rendered prompt gives at inference), with the tokenizer's
    BOS prepended when it has one. Segment ``k`` covers the tokens between the
    token counts of the text before it and the text up to its end; supervised
    segments keep their ids as labels, the rest (and BOS) get -100.

    That split is valid only if tokenising each prefix reproduces the start of
    the whole sequence, i.e. no token straddles a segment boundary. Otherwise
    ``mismatch`` is set (the analogue of LLaVA's "tokenization mismatch").
    """
    texts = [segment.text for segment in segments]
    full_text = "".join(texts)
    boundaries: list[int] = []
    offset = 0
    for text in texts[:-1]:
        offset += len(text)
        boundaries.append(offset)
    encoded = tokenizer([full_text[:end] for end in boundaries] + [full_text], add_special_tokens=False)["input_ids"]
    whole = list(encoded[-1])
    prefix_counts = [len(ids) for ids in encoded[:-1]]
    mismatch = any(whole[: len(ids)] != list(ids) for ids in encoded[:-1])

    labels: list[int] = []
    start = 0
    for segment, end in zip(segments, prefix_counts + [len(whole)]):
        end = max(end, start)
        labels.extend(whole[start:end] if segment.supervised else [IGNORE_INDEX] * (end - start))
        start = end
    labels = labels[: len(whole)] + [IGNORE_INDEX] * (len(whole) - len(labels))

    bos_id = tokenizer.bos_token_id
    if bos_id is not None:
        whole = [bos_id] + whole
        labels = [IGNORE_INDEX] + labels
    return TokenizedConversation(whole, labels, mismatch)


# --------------------------------------------------------------------------- images
def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad ``image`` to a square canvas of ``background`` colour, centred (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# --------------------------------------------------------------------------- dataset
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
            _validate_record(record, f"{self.source}: record {position}")
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
                mean = getattr(image_processor, "image_mean", None)
                if mean is None:
                    raise ValueError("image_aspect_ratio='pad' needs an image_processor with image_mean")
                self._background = tuple(int(value * 255) for value in mean)

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
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise _SkipSample("corrupt_image", f"{path}: {error}") from error
        if self._background is not None:
            image = expand_to_square(image, self._background)
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(pixel_values)[0]


# --------------------------------------------------------------------------- collator
@dataclass(frozen=True)
class LlavaCollator:
    """Pad dataset items into a batch for ``LlavaForConditionalGeneration(**batch)``.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask``
    (built from the lengths, so a pad id that also occurs in text is harmless),
    ``labels`` (padded with -100; only when the items have labels) and
    ``pixel_values`` stacked over the items that have one, in batch order (the
    order in which LLaVA scatters image features into image tokens); the key is
    absent when no item has an image.

    Args:
        pad_token_id: id used for padding ``input_ids``.
        padding_side: ``"right"`` for training, ``"left"`` for batched generation.
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of samples")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        longest = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        with_labels = all("labels" in feature for feature in features)

        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            span = slice(0, length) if self.padding_side == "right" else slice(longest - length, longest)
            input_ids[row, span] = torch.as_tensor(feature["input_ids"])
            attention_mask[row, span] = 1
            if with_labels:
                labels[row, span] = torch.as_tensor(feature["labels"])

        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            batch["labels"] = labels
        images = [feature["pixel_values"] for feature in features if feature.get("pixel_values") is not None]
        if images:
            shapes = {tuple(image.shape) for image in images}
            if len(shapes) != 1:
                raise ValueError(f"pixel_values in one batch must share a shape, got {sorted(shapes)}")
            batch["pixel_values"] = torch.stack(images)
        return batch


# --------------------------------------------------------------------------- sampler
class ModalityLengthGroupedSampler(Sampler[int]):
    """LLaVA's ``group_by_modality_length`` sampler: single-modality, length-grouped batches.

    ``lengths`` follows :attr:`LlavaDataset.modality_lengths`: positive for
    image samples, negative for text-only ones, never 0. Each epoch:

    1. the indices of each modality are shuffled and cut into megabatches of
       ``batch_size * world_size * gradient_accumulation_steps`` (one optimiser
       step over all ranks); each megabatch is sorted by length, longest first;
    2. the full megabatches of both modalities are shuffled together;
    3. the two incomplete remainders go last, image samples then text-only
       ones, each sorted by length.

    Consecutive runs of ``batch_size`` indices are batches, so every batch has
    one modality except at most one (where the two remainders meet), and
    samples of similar length share a batch. (LLaVA additionally balances total
    length across ranks inside a megabatch; here each batch is a consecutive run
    of the sorted megabatch, which minimises padding.) With a single modality
    this is plain length grouping. The order depends only on ``seed``,
    ``epoch`` and ``lengths``.

    Two modes:

    * ``rank=None``: yield the global order (``len(lengths)`` indices). Use this
      with transformers' ``Trainer``, whose accelerate-prepared DataLoader
      shards batches round-robin over ranks and calls :meth:`set_epoch`::

          class LlavaTrainer(Trainer):
              def _get_train_sampler(self, train_dataset=None):
                  dataset = train_dataset if train_dataset is not None else self.train_dataset
                  return ModalityLengthGroupedSampler(
                      dataset.modality_lengths,
                      batch_size=self.args.train_batch_size,
                      world_size=self.args.world_size,
                      gradient_accumulation_steps=self.args.gradient_accumulation_steps,
                      seed=self.args.seed,
                  )

    * ``rank=r``: yield only rank ``r``'s shard, for a plain ``DataLoader(...,
      sampler=sampler, batch_size=batch_size)`` per process (no accelerate). The
      global order is padded by repeating its first indices (``drop_last=False``)
      or cut (``drop_last=True``) to a multiple of ``batch_size * world_size``;
      then batch ``k`` goes to rank ``k % world_size``, the same assignment
      accelerate makes. Every rank gets the same number of full batches and the
      shards are disjoint apart from the padding. Call :meth:`set_epoch` on
      every rank each epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int | None = None,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1 or world_size < 1 or gradient_accumulation_steps < 1:
            raise ValueError(
                "batch_size, world_size and gradient_accumulation_steps must be >= 1, got "
                f"{batch_size}, {world_size}, {gradient_accumulation_steps}"
            )
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        lengths = [int(length) for length in lengths]
        if any(length == 0 for length in lengths):
            raise ValueError("lengths must be non-zero: the sign encodes the modality (>0 image, <0 text-only)")
        self.lengths = lengths
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.megabatch_size = batch_size * world_size * gradient_accumulation_steps
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for ``epoch`` (call before iterating, on every rank)."""
        self.epoch = epoch

    def global_order(self) -> list[int]:
        """The order of all indices for the current epoch (what ``rank=None`` yields)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        image_indices = [index for index, length in enumerate(self.lengths) if length > 0]
        text_indices = [index for index, length in enumerate(self.lengths) if length < 0]

        def by_length(indices: list[int]) -> list[int]:
            return sorted(indices, key=lambda index: -abs(self.lengths[index]))

        full: list[list[int]] = []
        remainders: list[int] = []
        for indices in (image_indices, text_indices):
            shuffled = [indices[k] for k in torch.randperm(len(indices), generator=generator).tolist()]
            cut = len(shuffled) - len(shuffled) % self.megabatch_size
            full.extend(
                by_length(shuffled[start : start + self.megabatch_size]) for start in range(0, cut, self.megabatch_size)
            )
            remainders.extend(by_length(shuffled[cut:]))
        order = torch.randperm(len(full), generator=generator).tolist()
        return [index for position in order for index in full[position]] + remainders

    def _shard_size(self) -> int:
        step = self.batch_size * self.world_size
        total = len(self.lengths)
        padded = total // step * step if self.drop_last else math.ceil(total / step) * step
        return padded // self.world_size

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        if self.rank is None:
            return iter(order)
        total = self._shard_size() * self.world_size
        if total > len(order):
            order = order + [order[k % len(order)] for k in range(total - len(order))]
        order = order[:total]
        batches = [order[start : start + self.batch_size] for start in range(0, total, self.batch_size)]
        return iter([index for batch in batches[self.rank :: self.world_size] for index in batch])

    def __len__(self) -> int:
        return len(self.lengths) if self.rank is None else self._shard_size()
