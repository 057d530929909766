"""Shape and key checks that turn a mismatched checkpoint into one clear error naming the key."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["CheckpointMismatchError", "check_shapes", "safetensors_shapes"]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into (the message names the key at fault)."""


def check_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], source: str,
                 require_all: bool = True) -> None:
    """Raises `CheckpointMismatchError` for the first key of ``found`` that is unknown or has the wrong shape,
    or (``require_all``) the first expected key that ``found`` lacks."""
    for key, shape in found.items():
        if key not in expected:
            hint = ""
            match = re.search(r"experts\.(\d+)\.", key)
            if match:
                hint = f" (expert {match.group(1)} does not exist in a model with fewer experts)"
            raise CheckpointMismatchError(f"{source}: unexpected key '{key}'{hint}")
        if tuple(shape) != tuple(expected[key]):
            raise CheckpointMismatchError(
                f"{source}: key '{key}' has shape {tuple(shape)} but the model built from its config expects "
                f"{tuple(expected[key])} (check num_experts and the hidden sizes in config.json)"
            )
    if require_all:
        missing = [k for k in expected if k not in found]
        if missing:
            raise CheckpointMismatchError(f"{source}: missing key '{missing[0]}' ({len(missing)} missing in all)")


def safetensors_shapes(folder: str | Path) -> dict[str, tuple] | None:
    """Tensor shapes stored in a local model folder's safetensors files (reads headers only), or None."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    from safetensors import safe_open

    shapes = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes
