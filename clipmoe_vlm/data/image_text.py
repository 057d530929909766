"""Image–caption pairs for contrastive (CLIP) training from any mix of ``--data`` sources, and the collate
function that drops unreadable images without stopping a run."""

from __future__ import annotations

import bisect
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .image_text_sources import (
    IMAGE_DECODE_ERRORS,
    LOADERS,
    MISSING_FILE,
    UNREADABLE_IMAGE,
    DataSourceError,
    ImageTextSource,
    SourceSpec,
    parse_source,
)

__all__ = ["ImageTextDataset", "collate_image_text"]


class ImageTextDataset(Dataset):
    """Image–caption pairs from one or more sources, concatenated in order.

    Args:
        sources: ``--data`` items (see the module docstring); a single string is one source.
        image_transform: PIL RGB image -> (3, H, W) tensor, e.g. `clip_image_transform`.
        tokenizer: list of B captions -> (B, L) LongTensor, e.g. `open_clip_tokenizer`.
        max_samples: use only the first N pairs; later pairs (and sources) are not read at all.

    ``dataset[i]`` is ``{"index": i, "pixel_values": (3, H, W) tensor or None, "input_ids": (L,) LongTensor,
    "error": None or str}``. ``error`` starts with the reason (``"missing file: ..."`` or
    ``"unreadable image: ..."``) and names the image. The caption is always tokenized.
    """

    def __init__(self, sources: Sequence[str | os.PathLike[str]], image_transform: Callable[[Image.Image], Any],
                 tokenizer: Callable[[list[str]], torch.Tensor], max_samples: int | None = None) -> None:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        if not sources:
            raise ValueError("no data sources given")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.max_samples = max_samples
        specs = [parse_source(spec) for spec in sources]  # every path is checked before anything is read
        self.sources: list[ImageTextSource] = []
        self.unread: list[SourceSpec] = []
        for spec in specs:
            remaining = None if max_samples is None else max_samples - sum(map(len, self.sources))
            if remaining == 0:
                self.unread.append(spec)
                continue
            source = LOADERS[spec.format](spec, remaining)
            if not len(source):
                notes = f" ({'; '.join(source.notes)})" if source.notes else ""
                raise DataSourceError(f"--data {spec.spec}: no image–caption pairs in {source.where()}{notes}")
            self.sources.append(source)
        self._ends = []
        total = 0
        for source in self.sources:
            total += len(source)
            self._ends.append(total)
        self.captions: list[str] = [caption for source in self.sources for caption in source.captions]

    def __len__(self) -> int:
        return len(self.captions)

    def locate(self, i: int) -> tuple[int, int]:
        """(source number, index within that source) of pair ``i``."""
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} pairs")
        k = bisect.bisect_right(self._ends, i)
        return k, i - (self._ends[k - 1] if k else 0)

    def image_location(self, i: int) -> str:
        """Where the image of pair ``i`` is: a path, ``SHARD.tar:MEMBER`` or ``DATASET, row N``."""
        k, j = self.locate(i)
        return self.sources[k].location(j)

    def __getitem__(self, i: int) -> dict:
        k, j = self.locate(i)
        i = self._ends[k] - len(self.sources[k]) + j  # a plain int, also for numpy or tensor indices
        input_ids = self.tokenizer([self.captions[i]])[0]
        try:
            image = self.sources[k].open_image(j)
        except FileNotFoundError as error:
            return {"index": i, "pixel_values": None, "input_ids": input_ids,
                    "error": f"{MISSING_FILE}: {self.sources[k].location(j)} ({error.strerror or error})"}
        except IMAGE_DECODE_ERRORS as error:
            return {"index": i, "pixel_values": None, "input_ids": input_ids,
                    "error": f"{UNREADABLE_IMAGE}: {self.sources[k].location(j)} ({type(error).__name__}: {error})"}
        return {"index": i, "pixel_values": self.image_transform(image), "input_ids": input_ids, "error": None}

    def close(self) -> None:
        """Closes file handles held open for random access (WebDataset shards) in this process."""
        for source in self.sources:
            if hasattr(source, "close"):
                source.close()

    def describe(self) -> str:
        """One line per source, for the run log: format, path, number of pairs (and what was left out)."""
        lines = []
        for source in self.sources:
            extra = list(source.notes)
            if source.truncated:
                extra.append(f"stopped at max_samples={self.max_samples:,}")
            suffix = f" ({'; '.join(extra)})" if extra else ""
            lines.append(f"{source.format:<5} {source.where()}: {len(source):,} pairs{suffix}")
        for spec in self.unread:
            lines.append(f"{spec.format:<5} {spec.spec}: not read (max_samples={self.max_samples:,} reached)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Batching and skip accounting


def collate_image_text(batch: list[dict]) -> dict:
    """Stacks the samples whose image loaded and drops the others, reporting them with the batch (collate runs
    in the DataLoader workers, so the batch is the only way the count reaches the training loop).

    Returns ``{"pixel_values": (B', 3, H, W), "input_ids": (B', L), "index": (B',) LongTensor, "num_skipped": int,
    "skipped": [(index, error), ...]}``. When every sample failed (B' = 0), ``pixel_values`` is None and
    ``input_ids``/``index`` have zero rows: skip such a batch.
    """
    kept = [sample for sample in batch if sample["pixel_values"] is not None]
    skipped = [(int(sample["index"]), str(sample["error"])) for sample in batch if sample["pixel_values"] is None]
    if kept:
        input_ids = torch.stack([sample["input_ids"] for sample in kept])
    elif batch:
        input_ids = torch.stack([sample["input_ids"] for sample in batch])[:0]
    else:
        input_ids = torch.zeros(0, 0, dtype=torch.long)
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in kept]) if kept else None,
        "input_ids": input_ids,
        "index": torch.tensor([int(sample["index"]) for sample in kept], dtype=torch.long),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }

