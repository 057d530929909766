"""The contrastive training engine shared by every recipe stage: one loop on accelerate, resumable.

Data order is a pure function of ``(seed, epoch)`` (`ClusterBatchSampler`), so a stage restarted from its last
checkpoint (model, optimizer, scheduler, RNG states and the position in the epoch) continues exactly where it
stopped. The data loader is not handed to accelerate: each process builds its own from the DDP-aware batch
sampler, and the scheduler is stepped once per optimizer step whatever the number of processes.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from clipmoe_vlm.losses import expert_load

from .contrastive import clip_contrastive_loss, gather_rows, gather_with_grad
from .mcl import ClusterBatchSampler
from .trainable import set_trainable

__all__ = ["StageSpec", "Engine", "StopRequested", "embed_pairs", "paired_recall"]


class StopRequested(RuntimeError):
    """Raised by ``stop_after_steps`` to simulate a run killed mid-stage (for testing ``--resume``)."""


@dataclass
class StageSpec:
    """Everything one stage trains with, given explicitly by its recipe."""

    name: str
    trainable: str  # a set of `upcycle.trainable`
    lr: float
    weight_decay: float
    labels: np.ndarray  # (N,) batch-cluster id per sample, -1 = not trained on (validation, unreadable)
    epochs: int
    batch_size: int  # per process
    warmup_steps: int
    label_smoothing: float
    temperature: float | None  # fixed softmax temperature; None: the model's own logit scale (frozen)
    learn_temperature: bool = False  # train the logit scale (uses the model's scale)
    leftover: str = "drop"  # samples that do not fill a batch of their cluster: drop, or pool ("mixed")
    router_losses: bool = False  # add the model's ``aux_loss`` (its config's router-loss coefficients)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Engine:
    """Runs the stages of one run on ``dataset``; stage folders go under ``work_dir``, ``log`` writes a metrics
    line. ``resume`` continues a stage from its last checkpoint (every ``save_every`` steps)."""

    def __init__(self, accelerator, dataset, work_dir: Path, log: Callable[[dict], None], *, seed: int = 0,
                 num_workers: int = 0, resume: bool = False, save_every: int = 50,
                 stop_after_steps: int | None = None):
        self.acc = accelerator
        self.seed = seed
        self.num_workers = num_workers
        self.resume = resume
        self.save_every = save_every
        self.stop_after_steps = stop_after_steps
        self.dataset = dataset
        self.work_dir = work_dir
        self.log = log
        self.total_steps_done = 0  # across stages in this process's run, for stop_after_steps
        self.skipped = 0
        self.skipped_examples: list = []

    # -------------------------------------------------------------------------------------------- data
    def loader(self, sampler) -> DataLoader:
        from clipmoe_vlm.data.image_text import collate_image_text

        workers = self.num_workers
        # A private generator: creating a loader must not draw from the global RNG, or a resumed run would
        # see different dropout masks than an uninterrupted one.
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate_image_text, num_workers=workers,
                          prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(0))

    def _note_skips(self, batch) -> None:
        self.skipped += batch["num_skipped"]
        if batch["num_skipped"] and len(self.skipped_examples) < 5:
            self.skipped_examples.extend(batch["skipped"][: 5 - len(self.skipped_examples)])

    # -------------------------------------------------------------------------------------------- training
    def train_stage(self, model, spec: StageSpec, on_epoch_end: Callable[[int, object], dict | None] | None = None):
        """Trains ``model`` for the stage (or loads its saved result); returns ``(model, summary)``.
        ``on_epoch_end(epoch, model)`` runs after each epoch (1-based); what it returns goes into the summary's
        ``epoch_metrics``."""
        acc = self.acc
        stage_dir = self.work_dir / spec.name
        done = stage_dir / "done.json"
        if done.is_file():
            model.load_state_dict(load_file(stage_dir / "model.safetensors"), strict=True)
            acc.print(f"[{spec.name}] already finished, loaded from {stage_dir}")
            return model, json.loads(done.read_text())

        trainable = set_trainable(model, spec.trainable, spec.learn_temperature)
        params = dict(model.named_parameters())
        decay = [params[n] for n in trainable if not n.endswith("bias") and params[n].dim() > 1]
        no_decay = [params[n] for n in trainable if n.endswith("bias") or params[n].dim() <= 1]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr)
        sampler = ClusterBatchSampler(spec.labels, spec.batch_size, acc.num_processes, acc.process_index, self.seed,
                                      spec.leftover)
        steps_per_epoch = len(sampler)
        if steps_per_epoch == 0:
            raise ValueError(f"[{spec.name}] no full global batch of {spec.batch_size * acc.num_processes} samples "
                             f"in any cluster: lower --batch-size or use more data ({sampler.stats.summary('drop')})")
        total_steps = steps_per_epoch * spec.epochs
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(spec.warmup_steps, total_steps // 2),
                                                    total_steps)

        start_step = 0
        ckpt = stage_dir / "checkpoint"
        if self.resume and (ckpt / "state.pt").is_file():
            model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=True)
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            start_step = state["step"]
            acc.print(f"[{spec.name}] resumed at step {start_step}/{total_steps}")

        ddp_model, optimizer = acc.prepare(model, optimizer)
        ddp_model.train()
        acc.print(f"[{spec.name}] {len(trainable)} trainable tensors "
                  f"({sum(params[n].numel() for n in trainable):,} weights), {total_steps} steps; "
                  f"batches: {sampler.stats.summary(sampler.leftover)}")
        bar = tqdm(total=total_steps, initial=start_step, desc=spec.name, disable=not acc.is_main_process,
                   dynamic_ncols=True)
        step = start_step
        last = {}
        epoch_metrics: list[dict] = []
        for epoch in range(start_step // steps_per_epoch, spec.epochs):
            sampler.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)
            for batch in self.loader(sampler):
                t0 = time.perf_counter()
                self._note_skips(batch)
                if batch["input_ids"].shape[0] == 0:  # every image of this batch was unreadable
                    if acc.num_processes > 1:
                        raise RuntimeError(f"[{spec.name}] every image of a batch failed to load on process "
                                           f"{acc.process_index}: {batch['skipped'][:2]}; check the data")
                    step += 1
                    self.total_steps_done += 1
                    scheduler.step()
                    bar.update(1)
                    continue
                losses = self._step(ddp_model, batch, spec)
                acc.backward(losses["loss"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                self.total_steps_done += 1
                n = batch["pixel_values"].shape[0] * acc.num_processes
                last = {k: float(v.detach()) for k, v in losses.items()}
                rate = n / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{last['loss']:.4f}", samples_s=f"{rate:.0f}")
                bar.update(1)
                self.log({"stage": spec.name, "step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": rate, **last})
                if step % self.save_every == 0 and step < total_steps:
                    self._checkpoint(model, optimizer, scheduler, step, ckpt)
                if self.stop_after_steps is not None and self.total_steps_done >= self.stop_after_steps:
                    self._checkpoint(model, optimizer, scheduler, step, ckpt)
                    bar.close()
                    raise StopRequested(f"stopped after {self.total_steps_done} steps (--stop-after-steps)")
            if on_epoch_end is not None:
                record = on_epoch_end(epoch + 1, acc.unwrap_model(ddp_model))
                if record:
                    epoch_metrics.append({"epoch": epoch + 1, **record})
                    self.log({"stage": spec.name, "epoch_end": epoch + 1, **record})
        bar.close()
        model = acc.unwrap_model(ddp_model)
        for p in model.parameters():
            p.requires_grad_(False)
        summary = {"stage": spec.name, "steps": total_steps, "final": last, "epoch_metrics": epoch_metrics,
                   "batches": sampler.stats.summary(sampler.leftover), "cluster_sizes": sampler.stats.cluster_sizes}
        if acc.is_main_process:
            stage_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, stage_dir / "model.safetensors")
            done.write_text(json.dumps(summary, indent=1))
        acc.wait_for_everyone()
        return model, summary

    def _step(self, model, batch, spec: StageSpec) -> dict:
        acc = self.acc
        pixel_values = batch["pixel_values"].to(acc.device)
        input_ids = batch["input_ids"].to(acc.device)
        kwargs = {"output_router_logits": True} if spec.router_losses else {}
        with acc.autocast():
            out = model(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
        core = acc.unwrap_model(model)
        # learned, the model's own (frozen) scale when no temperature is given, or the fixed 1/temperature
        use_model_scale = spec.learn_temperature or spec.temperature is None
        scale = core.logit_scale.exp() if use_model_scale else 1.0 / spec.temperature
        clip = clip_contrastive_loss(out.image_embeds, out.text_embeds, scale, spec.label_smoothing,
                                     gather=gather_with_grad, normalize=True)
        losses = {"clip_loss": clip, "loss": clip}
        aux = getattr(out, "aux_loss", None) if spec.router_losses else None
        if aux is not None:  # the model weighs its router losses by its config's coefficients
            losses["aux_loss"] = aux
            losses["loss"] = clip + aux
        return losses

    def _checkpoint(self, model, optimizer, scheduler, step: int, ckpt: Path) -> None:
        acc = self.acc
        if acc.is_main_process:
            ckpt.mkdir(parents=True, exist_ok=True)
            core = acc.unwrap_model(model)
            save_file({k: v.contiguous() for k, v in core.state_dict().items()}, ckpt / "model.safetensors.tmp")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": _rng_state(), "step": step}, ckpt / "state.pt.tmp")
            (ckpt / "model.safetensors.tmp").replace(ckpt / "model.safetensors")
            (ckpt / "state.pt.tmp").replace(ckpt / "state.pt")
        acc.wait_for_everyone()


# ------------------------------------------------------------------------------------------------ embedding


@torch.no_grad()
def embed_pairs(model, dataset, indices, batch_size: int, accelerator, num_workers: int = 0,
                output_router_logits: bool = False, desc: str = "embed"):
    """L2-normalised image and text embeddings of ``indices`` (computed shard-wise over processes).

    Returns ``(image (N, D), text (N, D), valid (N,) bool, router)`` in the order of ``indices``; rows of images
    that failed to load are zero and ``valid`` False. ``router`` is the (L, E) expert load per tower when asked.
    """
    from clipmoe_vlm.data.image_text import collate_image_text

    indices = list(indices)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = indices[rank::world]
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_image_text, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    rows, img_parts, txt_parts = [], [], []
    loads = {"image": [], "text": []}
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False):
        if batch["pixel_values"].shape[0] == 0:
            continue
        kwargs = {"output_router_logits": True} if output_router_logits else {}
        with accelerator.autocast():
            out = model(input_ids=batch["input_ids"].to(accelerator.device),
                        pixel_values=batch["pixel_values"].to(accelerator.device), **kwargs)
        rows.append(batch["index"])
        img_parts.append(out.image_embeds.float().cpu())
        txt_parts.append(out.text_embeds.float().cpu())
        if output_router_logits:
            if out.image_router_logits:
                loads["image"].append(expert_load(out.image_router_logits, model.config.vision_config.top_k))
            if out.text_router_logits:
                loads["text"].append(expert_load(out.text_router_logits, model.config.text_config.top_k))
    model.train(was_training)
    dim = model.config.projection_dim
    rows_t = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    img_t = torch.cat(img_parts) if img_parts else torch.zeros(0, dim)
    txt_t = torch.cat(txt_parts) if txt_parts else torch.zeros(0, dim)
    rows_t = gather_rows(rows_t[:, None])[:, 0]
    img_t, txt_t = gather_rows(img_t), gather_rows(txt_t)
    position = {int(i): k for k, i in enumerate(indices)}
    image = torch.zeros(len(indices), dim)
    text = torch.zeros(len(indices), dim)
    valid = torch.zeros(len(indices), dtype=torch.bool)
    for r, i_vec, t_vec in zip(rows_t.tolist(), img_t, txt_t):
        image[position[r]], text[position[r]], valid[position[r]] = i_vec, t_vec, True
    router = {k: torch.stack(v).mean(0) for k, v in loads.items() if v} if output_router_logits else None
    return image, text, valid, router


def paired_recall(image: torch.Tensor, text: torch.Tensor) -> dict:
    """Recall@1 and @5 both ways for paired rows (row i of ``image`` belongs to row i of ``text``), with the
    evaluation library's keys (``i2t_R@1`` ...) and ``n``."""
    if len(image) == 0:
        return {}
    from clipmoe_vlm.evaluation.encoder import retrieval_metrics

    metrics = retrieval_metrics(image, text, list(range(len(image))), ks=(1, 5))
    return {**{key: round(value, 4) for key, value in metrics.items()}, "n": len(image)}
