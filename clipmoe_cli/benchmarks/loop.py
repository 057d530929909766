"""The ``loop`` item: the upcycling engine's whole training loop against the model's raw training step.

The raw step is forward, contrastive loss, backward and AdamW on one batch already in memory. The loop is
`upcycle.engine.Engine.train_stage` over an epoch of a small image–caption world: sampler, data loader,
collate, logging, progress bar, the final save. Both train the same tiny dense CLIP at the same batch size, and
the rounds alternate, so a change in the machine's load hits both. Target: the loop at >= 0.9 of the raw
step's samples/s with the pairs decoded once (`clipmoe_vlm.data.decoded_pairs`); the streaming loader (PNG
decoding in worker processes) is measured beside it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel

from clipmoe_vlm.data.decoded_pairs import DecodedPairs
from clipmoe_vlm.data.image_text import ImageTextDataset, collate_image_text
from clipmoe_vlm.loading import tiny_clip_config
from clipmoe_vlm.processing import clip_image_transform, open_clip_tokenizer
from upcycle.contrastive import clip_contrastive_loss
from upcycle.engine import Engine, StageSpec
from upcycle.trainable import set_trainable

from .data import write_image_world

__all__ = ["bench_loop"]


def _raw_steps(config, batch: dict, steps: int) -> float:
    """Seconds for ``steps`` raw training steps on one in-memory batch."""
    torch.manual_seed(0)
    model = CLIPModel(config).train()
    set_trainable(model, "all", learn_temperature=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        loss = clip_contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _loop(config, dataset, work: Path, batch_size: int, workers: int, accelerator) -> tuple[float, int]:
    """(seconds, optimizer steps) of one engine epoch over ``dataset``."""
    torch.manual_seed(0)
    model = CLIPModel(config)
    engine = Engine(accelerator, dataset, work, lambda record: None, num_workers=workers)
    spec = StageSpec("loop", "all", 1e-4, 0.1, np.zeros(len(dataset), dtype=np.int64), epochs=1,
                     batch_size=batch_size, warmup_steps=0, label_smoothing=0.0, temperature=None,
                     learn_temperature=True)
    start = time.perf_counter()
    _, summary = engine.train_stage(model, spec)
    return time.perf_counter() - start, summary["steps"]


def bench_loop(num_images: int, batch: int, workers: int, repeats: int, log=print) -> list[dict]:
    from accelerate import Accelerator

    config = tiny_clip_config()
    accelerator = Accelerator(cpu=True)
    with tempfile.TemporaryDirectory(prefix="clipmoe-bench-loop-") as tmp:
        root = Path(tmp)
        captions = write_image_world(root / "world", num_images, config.vision_config.image_size)
        streaming = ImageTextDataset([captions], clip_image_transform(config.vision_config.image_size),
                                     open_clip_tokenizer(config.text_config.max_position_embeddings))
        decoded = DecodedPairs.from_dataset(streaming, progress=False)
        first = collate_image_text([decoded[i] for i in range(batch)])
        times: dict[str, list[float]] = {"raw_step": [], "loop_decoded": [], "loop_streaming": []}
        steps = num_images // batch
        for r in range(repeats):
            times["raw_step"].append(_raw_steps(config, first, steps))
            seconds, done = _loop(config, decoded, root / f"decoded-{r}", batch, 0, accelerator)
            times["loop_decoded"].append(seconds)
            seconds, _ = _loop(config, streaming, root / f"streaming-{r}", batch, workers, accelerator)
            times["loop_streaming"].append(seconds)
            assert done == steps, (done, steps)
    samples = steps * batch
    rates = {name: samples / statistics.median(values) for name, values in times.items()}
    rows = []
    for name in ("loop_decoded", "loop_streaming"):
        ratio = statistics.median(raw / loop for raw, loop in zip(times["raw_step"], times[name]))
        targeted = name == "loop_decoded"  # the streaming loop is the reference the decoded one replaces
        row = {"contender": name, "images": num_images, "batch": batch, "steps": steps,
               "workers": 0 if targeted else workers, "samples_per_s": rates[name],
               "raw_step_samples_per_s": rates["raw_step"], "ratio_to_raw_step": ratio,
               "target": ">= 0.90" if targeted else "reference", "pass": ratio >= 0.9 if targeted else None,
               "times_s": times[name], "raw_times_s": times["raw_step"]}
        rows.append(row)
        verdict = f"target >= 0.90, {'ok' if row['pass'] else 'MISS'}" if targeted else "reference"
        log(f"loop      {name:15s} {num_images} images B={batch}  {rates[name]:7.1f} samples/s  raw step "
            f"{rates['raw_step']:7.1f} samples/s  ratio {ratio:.3f} ({verdict})")
    return rows
