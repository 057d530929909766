"""Counters of what :class:`clipmoe_vlm.data.llava_dataset.LlavaDataset` did (skips, repairs, truncations).

Kept apart from the dataset because the counting must work across DataLoader worker processes (shared memory),
which is independent of how a sample is built.
"""

from __future__ import annotations

import torch
from torch.utils.data import get_worker_info

__all__ = ["DataStats"]


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
