"""Where the embedded default runs keep their files (the Shapes world, the tiny dense base, run outputs).

Every default command (upcycling, LLaVA training, evaluation) with no data or model arguments uses these paths,
so one command's output is the next one's input:

- ``cache_dir()``: ``$CLIPMOE_CACHE`` or ``.cache/clipmoe-vlm`` under the current folder;
- ``world_dir(seed)``: the generated Shapes world (see `clipmoe_vlm.data.shapes.generate_world`);
- ``base_dir(seed)``: the tiny dense CLIP trained from scratch on the world (a transformers ``CLIPModel``
  folder), which stands in for a pretrained base;
- ``RUNS``: ``runs/``; the default CLIP-MoE is ``runs/clip-moe`` (`DEFAULT_CLIPMOE`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_CLIPMOE", "RUNS", "base_dir", "cache_dir", "ensure_world", "world_dir"]

RUNS = Path("runs")
DEFAULT_CLIPMOE = RUNS / "clip-moe"


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPMOE_CACHE", ".cache/clipmoe-vlm"))


def world_dir(seed: int = 0, scale: float = 1.0) -> Path:
    return cache_dir() / (f"shapes-seed{seed}" if scale == 1.0 else f"shapes-seed{seed}-x{scale:g}")


def base_dir(seed: int = 0) -> Path:
    return cache_dir() / f"base-shapes-seed{seed}"


from .data.shapes import DEFAULT_WORLD_SIZES as WORLD_SIZES


def ensure_world(seed: int = 0, scale: float = 1.0) -> Path:
    """Generates the Shapes world once (cached by its manifest) and returns its folder. ``scale`` multiplies every
    set's size (tests use small worlds; each scale has its own folder)."""
    from .data.shapes import generate_world

    root = world_dir(seed, scale)
    sizes = {k: max(2, int(round(v * scale))) for k, v in WORLD_SIZES.items()}
    generate_world(root, seed=seed, eval_dir=root / "eval" / "data", **sizes)
    return root
