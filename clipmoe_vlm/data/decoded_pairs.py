"""Image–caption pairs decoded, transformed and tokenized once, then served from tensors.

For data that fits in memory (the Shapes world, a small ``--data``), decoding PNGs and tokenizing captions at
every step costs more than the tiny model's step itself. `DecodedPairs` serves exactly the items of the
`ImageTextDataset` it was built from: same indices, same ``pixel_values`` and ``input_ids`` tensors, and the same
``error`` strings for unreadable images. The tensors are cached in one safetensors file whose name is a
fingerprint of the pairs (sources, their files, captions) and of the transform and tokenizer (their outputs on a
fixed probe), so a changed image size, normalisation or context length never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .image_text import ImageTextDataset

__all__ = ["DEFAULT_MEMORY_LIMIT", "DecodedPairs", "decoded_bytes", "fingerprint"]

DEFAULT_MEMORY_LIMIT = 2 * 1024**3  # bytes of float32 pixels that count as "fits in memory"


def _probe_image() -> Image.Image:
    """A fixed, non-square RGB image: resizing, cropping and normalisation all leave a trace on it."""
    grid = np.indices((37, 53)).sum(axis=0)
    pixels = np.stack([grid * 5 % 256, grid * 11 % 256, grid * 3 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def _files_of(dataset: ImageTextDataset) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of the files behind each source (caption files, shards, and the image files of
    path-based sources), so an edited file changes the fingerprint."""
    entries = []
    for source in dataset.sources:
        paths = [*(getattr(source, "shards", None) or [source.spec.path]), *getattr(source, "image_paths", [])]
        for path in map(Path, paths):
            if path.is_file():
                stat = path.stat()
                entries.append((str(path.resolve()), stat.st_size, int(stat.st_mtime)))
    return entries


def fingerprint(dataset: ImageTextDataset) -> str:
    """A hash of everything the decoded tensors depend on."""
    digest = hashlib.sha256()
    probe = dataset.image_transform(_probe_image())
    digest.update(str((tuple(probe.shape), str(probe.dtype))).encode())
    digest.update(probe.contiguous().numpy().tobytes())
    digest.update(dataset.tokenizer(["a probe caption, 12 words"]).numpy().tobytes())
    digest.update(json.dumps([_files_of(dataset), dataset.captions, dataset.max_samples]).encode())
    return digest.hexdigest()[:24]


def decoded_bytes(dataset: ImageTextDataset) -> int:
    """Bytes the decoded float32 pixels of ``dataset`` would take."""
    probe = dataset.image_transform(_probe_image())
    return len(dataset) * probe.numel() * 4


class DecodedPairs(Dataset):
    """The items of an `ImageTextDataset`, precomputed (see the module docstring); build with `from_dataset`."""

    def __init__(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, errors: list[str | None],
                 description: str) -> None:
        if not len(pixel_values) == len(input_ids) == len(errors):
            raise ValueError("pixel_values, input_ids and errors must have one row per pair")
        self.pixel_values = pixel_values
        self.input_ids = input_ids
        self.errors = errors
        self._description = description

    @classmethod
    def from_dataset(cls, dataset: ImageTextDataset, cache_dir: str | os.PathLike[str] | None = None,
                     progress: bool = True) -> DecodedPairs:
        """Decodes ``dataset`` once (or loads the cached tensors from ``cache_dir``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        description = dataset.describe()
        key = fingerprint(dataset)
        path = Path(cache_dir) / f"pairs-{key}.safetensors" if cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                tensors = load_file(path)
                errors = json.loads((path.with_suffix(".errors.json")).read_text())
                return cls(tensors["pixel_values"], tensors["input_ids"], errors, description)
            except (OSError, ValueError, KeyError, SafetensorError) as error:  # a truncated cache is rebuilt, not trusted
                print(f"decoded-pairs cache {path} unreadable ({error}); decoding again")
        items = [dataset[i] for i in tqdm(range(len(dataset)), desc="decode pairs once", disable=not progress,
                                          leave=False)]
        shape = next((item["pixel_values"].shape for item in items if item["pixel_values"] is not None), None)
        if shape is None:
            raise ValueError(f"no image of the data could be read ({items[0]['error'] if items else 'no pairs'})")
        pixel_values = torch.zeros((len(items), *shape), dtype=torch.float32)
        for i, item in enumerate(items):
            if item["pixel_values"] is not None:
                pixel_values[i] = item["pixel_values"]
        input_ids = torch.stack([item["input_ids"] for item in items])
        errors = [item["error"] for item in items]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"pixel_values": pixel_values, "input_ids": input_ids}, tmp)
            path.with_suffix(".errors.json").write_text(json.dumps(errors))
            tmp.replace(path)  # written last and atomically: a killed run leaves no half cache behind
        return cls(pixel_values, input_ids, errors, description)

    def __len__(self) -> int:
        return len(self.errors)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        error = self.errors[i]
        return {"index": i, "pixel_values": None if error else self.pixel_values[i], "input_ids": self.input_ids[i],
                "error": error}

    def describe(self) -> str:
        return self._description + f"\n(decoded once: {len(self):,} pairs held in memory)"

    def close(self) -> None:
        """Nothing to close (the streaming dataset's interface)."""
