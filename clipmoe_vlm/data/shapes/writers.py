"""File plumbing shared by every writer: one place fixes encodings, newlines and the parquet layout, which
the byte-identical output of a seed depends on."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .world import DEFAULT_CONFIG, ShapesConfig, _check_image_size, _check_seed


@dataclass
class WriteResult:
    """What a writer produced: named files (absolute paths), folders it owns, and item counts."""

    files: dict[str, Path] = field(default_factory=dict)
    dirs: list[Path] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def update(self, other: WriteResult) -> None:
        self.files.update(other.files)
        self.dirs.extend(other.dirs)
        self.counts.update(other.counts)


def _progress(iterable: Iterable[Any], desc: str, total: int, enabled: bool) -> Iterable[Any]:
    return tqdm(iterable, desc=f"shapes: {desc}", total=total, disable=not enabled, leave=False)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def _write_json(path: Path, obj: Any, *, indent: int | None = 1) -> None:
    _write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    _write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _save_image(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _setup(seed: int, image_size: int, config: ShapesConfig | None) -> tuple[int, int, ShapesConfig]:
    return _check_seed(seed), _check_image_size(image_size), config or DEFAULT_CONFIG


def _write_parquet(path: Path, rows: list[dict[str, Any]], features: Any) -> None:
    """Write rows with ``datasets`` feature metadata, as Hugging Face image datasets are stored."""
    import datasets  # local import: keeps ``import clipmoe_vlm`` light
    import pyarrow.parquet as pq

    table = datasets.Dataset.from_list(rows, features=features).data.table
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), compression="snappy")


def _image_cell(data: bytes, name: str) -> dict[str, Any]:
    return {"bytes": data, "path": name}
