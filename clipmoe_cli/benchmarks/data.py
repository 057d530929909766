"""The ``data`` item: `ImageTextDataset` + `collate_image_text` through a DataLoader, samples/s, against the
samples/s an MCL training step of the tiny Shapes CLIP-MoE consumes."""

from __future__ import annotations

import json
import random
import statistics
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clipmoe_vlm.data.image_text import ImageTextDataset, collate_image_text
from clipmoe_vlm.loading import tiny_clip_config
from clipmoe_vlm.processing import clip_image_transform, open_clip_tokenizer

from .models import clip_moe
from .timing import interleaved
from .training import train_step_fn

__all__ = ["bench_data", "write_image_world"]


def write_image_world(root: Path, n: int, image_size: int = 64) -> Path:
    """``n`` PNG images of random coloured shapes and a captions.jsonl beside them (a stand-in Shapes world)."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    lines = []
    for i in range(n):
        img = Image.new("RGB", (image_size, image_size), rng.choice(["white", "black", "gray"]))
        draw = ImageDraw.Draw(img)
        c = rng.choice(colors)
        x0, y0 = rng.randrange(image_size // 2), rng.randrange(image_size // 2)
        box = (x0, y0, x0 + rng.randrange(8, image_size // 2), y0 + rng.randrange(8, image_size // 2))
        shape = rng.choice(["circle", "square"])
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=c)
        path = root / "images" / f"{i:05d}.png"
        img.save(path)
        lines.append(json.dumps({"image": f"images/{i:05d}.png", "caption": f"a {c} {shape} on a plain background"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


def bench_data(num_images: int, batch: int, workers: int, repeats: int, data: str | None = None,
               log=print) -> dict:
    config = tiny_clip_config()
    with tempfile.TemporaryDirectory() as tmp:
        source = data or str(write_image_world(Path(tmp), num_images, config.vision_config.image_size))
        ds = ImageTextDataset([source], clip_image_transform(config.vision_config.image_size),
                              open_clip_tokenizer(config.text_config.max_position_embeddings),
                              max_samples=num_images)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=collate_image_text,
                            num_workers=workers, persistent_workers=workers > 0,
                            prefetch_factor=2 if workers else None, drop_last=True,
                            generator=torch.Generator().manual_seed(0))
        batches_per_round = max(1, len(ds) // batch)

        def epoch():
            n = 0
            for b in loader:
                n += b["pixel_values"].shape[0]
            return n

        model = clip_moe(config)
        step = train_step_fn(model, "mcl", batch)
        step()
        res = interleaved({"loader_epoch": epoch, "train_step": step}, repeats=repeats, reference="train_step")
        loader_sps = batches_per_round * batch / res["median_s"]["loader_epoch"]
        step_sps = batch / res["median_s"]["train_step"]
        rounds = [(batches_per_round * batch / a) / (batch / b)
                  for a, b in zip(res["times_s"]["loader_epoch"], res["times_s"]["train_step"])]
        ratio = statistics.median(rounds)
        row = {"images": len(ds), "batch": batch, "workers": workers, "image_size": config.vision_config.image_size,
               "source": "given" if data else "generated PNGs", "loader_samples_per_s": loader_sps,
               "train_step_samples_per_s": step_sps, "loader_over_step": ratio, "target": ">= 1.0",
               "pass": ratio >= 1.0}
        log(f"data      {len(ds)} images, batch {batch}, {workers} workers  loader {loader_sps:8.1f} samples/s  "
            f"MCL step {step_sps:8.1f} samples/s  ratio {ratio:.2f} (target >= 1, {'ok' if row['pass'] else 'MISS'})")
    return row
