"""Turning LLaVA samples into batches: the padding collator and the modality-length grouped sampler.

* :class:`LlavaCollator` pads a list of samples into a model batch.
* :class:`ModalityLengthGroupedSampler` is LLaVA's ``group_by_modality_length``
  sampler, deterministic per seed and epoch, and shardable over ranks.

Neither needs the dataset class: the sampler takes the lengths list
(:attr:`clipmoe_vlm.data.llava_dataset.LlavaDataset.modality_lengths`), the
collator the items.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import Sampler

from clipmoe_vlm.data.llava_tokenize import IGNORE_INDEX

__all__ = ["LlavaCollator", "ModalityLengthGroupedSampler"]


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
