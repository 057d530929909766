"""Reading and checking LLaVA-1.5 data records (JSON list or JSONL), before any tokenisation or image work."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["load_llava_records", "validate_record"]


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


def validate_record(record: Any, where: str) -> None:
    """Check the shape of one record (``where`` names it in the error), so bad data fails at load time, not mid-run.

    Raises:
        ValueError: not an object, no non-empty ``conversations`` list, or an ``image`` that is not one path.
    """
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
