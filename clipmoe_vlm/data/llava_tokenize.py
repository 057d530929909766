"""Tokenising a rendered LLaVA conversation into ``input_ids`` and ``labels`` (only assistant text supervised)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from clipmoe_vlm.data.conversation import Segment

__all__ = ["IGNORE_INDEX", "TokenizedConversation", "tokenize_conversation"]

# Label of tokens the loss ignores (PyTorch's cross-entropy default); the collator pads labels with it too.
IGNORE_INDEX = -100


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
