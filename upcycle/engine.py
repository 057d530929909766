"""The contrastive training engine shared by every recipe stage: one loop on accelerate, resumable.

Data order is a pure function of ``(seed, epoch)`` (`ClusterBatchSampler`), so a stage restarted from its last
checkpoint (model, optimizer, scheduler, RNG states and the position in the epoch) continues exactly where it
stopped. The data loader is not handed to accelerate: each process builds its own from the DDP-aware batch
sampler, and the scheduler is stepped once per optimizer step whatever the number of processes.

Every file is written under a temporary name and renamed into place, so a run killed at any moment leaves
each file either whole or absent; a checkpoint is a folder ``checkpoint/step-N`` renamed into place as a whole,
so its weights and optimizer state always belong to the same step.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from clipmoe_vlm.distributed import describe_launch, sharded_engine
from clipmoe_vlm.files import atomic_write_text
from clipmoe_vlm.losses import expert_load

from .contrastive import clip_contrastive_loss, gather_rows, gather_with_grad
from .mcl import ClusterBatchSampler
from .trainable import set_trainable

__all__ = ["StageSpec", "Engine", "MetricsLog", "StopRequested", "embed_pairs", "load_weights",
           "paired_recall", "skip_together"]


class StopRequested(RuntimeError):
    """Raised by ``stop_after_steps`` to simulate a run killed mid-stage (for testing ``--resume``)."""


@dataclass
class StageSpec:
    """Everything one stage trains with, given explicitly by its recipe."""

    name: str
    trainable: str  # a set of `upcycle.trainable`
    lr: float
    weight_decay: float
    labels: np.ndarray  # (N,) batch-cluster id per sample; < 0: not trained on (-1 held out, -2 unreadable)
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


# ------------------------------------------------------------------------------------------------ files


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _save_weights(model, path: Path) -> None:
    tmp = _tmp(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def load_weights(path: Path, what: str, remedy: str) -> dict:
    """The tensors of the safetensors file ``path``; a truncated or damaged file is a ValueError naming it."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read {what} ({type(err).__name__}: {err}); {remedy}") from None


def _load_state(path: Path, remedy: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: cannot read the checkpoint's optimizer state ({type(err).__name__}: {err}); "
                         f"{remedy}") from None


def _read_json(path: Path, what: str, remedy: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read {what} ({type(err).__name__}: {err}); {remedy}") from None


_STEP_DIR = re.compile(r"step-(\d+)")


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``step-N``; ``.tmp`` folders are unfinished)."""
    if not root.is_dir():
        return None
    steps = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    if not steps and (root / "state.pt").is_file():
        return root  # the flat layout of earlier versions
    return max(steps, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)), default=None)


class MetricsLog:
    """``metrics.jsonl``: one line per optimizer step (plus epoch-end probes). ``rewind`` drops what a stage
    wrote after the step it continues from, so a resumed or restarted stage never lists a step twice.

    With ``tensorboard`` (a folder), each stage's numeric values are also TensorBoard scalars in
    ``tensorboard/STAGE``, at the stage's step (epoch-end probes under ``epoch_end/``, at the epoch's last step).
    They are a view of the file: when a stage (re)starts its TensorBoard run is purged and written again from
    the lines kept, so it never shows a step twice either."""

    def __init__(self, path: Path, enabled: bool = True, tensorboard: Path | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard = Path(tensorboard) if tensorboard is not None and enabled else None
        self._writer = None
        self._stage: str | None = None
        self._steps_per_epoch = 1

    def __call__(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:  # one short write per line
                f.write(json.dumps(record) + "\n")
            if self._writer is not None and record.get("stage") == self._stage:
                self._scalars(record)

    def rewind(self, stage: str, step: int, steps_per_epoch: int) -> None:
        """Keeps the lines of ``stage`` up to ``step`` (epoch-end records of epochs that ended before it)."""
        if not self.enabled:
            return
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        keep, kept_records = [], []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if record.get("stage") == stage:
                if record.get("step", 0) > step:
                    continue
                # an epoch-end probe runs after the checkpoint of that epoch's last step: redone on resume
                if "epoch_end" in record and record["epoch_end"] * steps_per_epoch >= step:
                    continue
                kept_records.append(record)
            keep.append(line)
        if keep != lines:
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        if self.tensorboard is not None:
            self._open_stage(stage, steps_per_epoch, kept_records)

    def _open_stage(self, stage: str, steps_per_epoch: int, kept: list[dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        # purge_step=1 drops every event of this stage's run (steps start at 1); the kept lines are written again
        self._writer = SummaryWriter(str(self.tensorboard / stage), purge_step=1, flush_secs=10)
        self._stage, self._steps_per_epoch = stage, steps_per_epoch
        for record in kept:
            self._scalars(record)

    def _scalars(self, record: dict) -> None:
        if "epoch_end" in record:
            step, prefix = record["epoch_end"] * self._steps_per_epoch, "epoch_end/"
        elif "step" in record:
            step, prefix = record["step"], ""
        else:
            return
        for key, value in record.items():
            if key not in ("stage", "step", "epoch", "epoch_end") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                self._writer.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        """Flushes and closes the TensorBoard run of the current stage (if any)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def skip_together(accelerator, empty: bool) -> bool:
    """Whether every process skips this step: true when the batch of ANY process has no readable image.

    A process without an image cannot run the forward pass, and the step needs every process (the contrastive
    loss all-gathers the embeddings, DDP all-reduces the gradients): one process skipping alone would hang or
    desynchronise the others. Feeding it a placeholder pair would put a fake negative into everyone's loss. So
    all processes skip the step together, and optimizer, scheduler and step counters stay identical across
    processes; the readable samples of the other processes in that one step are not trained on (the step is
    logged as skipped).
    """
    if accelerator.num_processes == 1:
        return empty
    import torch.distributed as dist

    flag = torch.tensor([1.0 if empty else 0.0], device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def whole_models_under_zero3(accelerator) -> None:
    """Under DeepSpeed ZeRO-3, models built from now on in this process are whole (no ``zero.Init``).

    accelerate registers its ZeRO-3 config with transformers, which then partitions every model it builds. The
    recipes use whole models between stages (clustering embeddings, assembling experts, evaluation); the engine
    partitions each stage's copy when it prepares it. Nothing changes without DeepSpeed ZeRO-3."""
    if sharded_engine(accelerator) == "DeepSpeed ZeRO-3":
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _prepare_for_sharded_engine(accelerator, model, spec: StageSpec):
    """The copy of ``model`` that FSDP / DeepSpeed will train, the frozen logit scale (or None), and the names of
    the copy's scalar parameters made 1-element vectors (CLIP's ``logit_scale``: FSDP2's ``fully_shard`` refuses
    0-dim parameters, and DeepSpeed's initial broadcast views each parameter as bytes, which torch refuses for
    0-dim tensors; the 1-element copy computes the same).

    - The logit scale is read here, before sharding: a sharded parameter cannot be read outside the forward pass.
      A learned temperature needs it inside the loss, so it is refused where parameters are sharded.
    - DeepSpeed needs its batch sizes when no data loader is prepared (the engine builds its own loaders), and
      ZeRO-3 the consolidated weights at the end of the stage.
    """
    import copy

    engine = sharded_engine(accelerator)
    zero3 = engine == "DeepSpeed ZeRO-3"
    if spec.learn_temperature and (zero3 or engine.startswith("FSDP")):
        raise ValueError(f"[{spec.name}] a learned temperature (--learn-temperature) cannot be trained under "
                         f"{engine}: its parameter is sharded; use a fixed --temperature, DDP or ZeRO-2")
    scale = None
    if spec.temperature is None and not spec.learn_temperature:
        scale = model.logit_scale.detach().exp().to(accelerator.device)
    trained = copy.deepcopy(model)
    scalars: list[str] = []
    if engine == "FSDP2":
        try:
            trained.get_input_embeddings()
        except NotImplementedError:
            # accelerate 1.16's FSDP2 preparation asks every model for its input embeddings (to shard them apart);
            # transformers 5 raises for a two-tower CLIP, which has no single one: the copy answers None
            trained.get_input_embeddings = lambda: None
    for name, parameter in list(trained.named_parameters()):
        if parameter.dim() == 0:
            owner, _, leaf = name.rpartition(".")
            setattr(trained.get_submodule(owner), leaf,
                    torch.nn.Parameter(parameter.detach().reshape(1), requires_grad=parameter.requires_grad))
            scalars.append(name)
    if engine.startswith("DeepSpeed"):
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        steps = config.get("gradient_accumulation_steps", 1)
        steps = 1 if steps == "auto" else steps
        config["train_micro_batch_size_per_gpu"] = spec.batch_size
        config["train_batch_size"] = spec.batch_size * accelerator.num_processes * steps
        if config.get("gradient_clipping") == "auto":  # accelerate would fill in 1.0; the engine never clips
            config["gradient_clipping"] = 0.0
        if zero3:
            config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return trained, scale, scalars


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
        # unreadable images by their error message (it names the file): a file is counted once however many
        # epochs or stages read it, and pairs sharing one image file count once
        self.skipped_keys: set[str] = set()
        self.skipped_examples: list = []
        self._fsdp_wrap = None  # FSDP: the plugin's wrapping settings as configured, restored for every stage

    @property
    def skipped(self) -> int:
        """Unreadable image files met in training by this process."""
        return len(self.skipped_keys)

    # -------------------------------------------------------------------------------------------- data
    def loader(self, sampler) -> DataLoader:
        from clipmoe_vlm.data.image_text import collate_image_text

        workers = self.num_workers
        # A private generator: creating a loader must not draw from the global RNG, or a resumed run would
        # see different dropout masks than an uninterrupted one.
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate_image_text, num_workers=workers,
                          prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(0))

    def _note_skips(self, batch) -> None:
        for index, error in batch["skipped"]:
            if error not in self.skipped_keys:
                self.skipped_keys.add(error)
                if len(self.skipped_examples) < 5:
                    self.skipped_examples.append((index, error))

    # -------------------------------------------------------------------------------------------- training
    def train_stage(self, model, spec: StageSpec, on_epoch_end: Callable[[int, object], dict | None] | None = None):
        """Trains ``model`` for the stage (or loads its saved result); returns ``(model, summary)``.
        ``on_epoch_end(epoch, model)`` runs after each epoch (1-based); what it returns goes into the summary's
        ``epoch_metrics``."""
        acc = self.acc
        stage_dir = self.work_dir / spec.name
        done = stage_dir / "done.json"
        again = f"delete the stage folder {stage_dir} to train the stage again"
        if done.is_file():
            summary = _read_json(done, f"the summary of the finished stage {spec.name}", again)
            model.load_state_dict(load_weights(stage_dir / "model.safetensors", f"the weights of the finished stage "
                                               f"{spec.name}", again), strict=True)
            acc.print(f"[{spec.name}] already finished, loaded from {stage_dir}")
            return model, summary

        sharded = sharded_engine(acc)
        if sharded:
            # FSDP / DeepSpeed change the module they prepare (sharded parameters, hooks): train a copy and load
            # its gathered weights back into ``model`` at the end, so callers keep a plain model
            trained_model, model_scale, scalars = _prepare_for_sharded_engine(acc, model, spec)
        else:
            trained_model, model_scale, scalars = model, None, []
        trainable = set_trainable(trained_model, spec.trainable, spec.learn_temperature)
        if sharded == "DeepSpeed ZeRO-3":  # frozen MoE blocks become ZeRO-3 leaves (see the function)
            from clipmoe_vlm.llava.trainer import mark_zero3_leaf_blocks

            mark_zero3_leaf_blocks(trained_model)
        params = dict(trained_model.named_parameters())
        decay = [params[n] for n in trainable if not n.endswith("bias") and params[n].dim() > 1]
        no_decay = [params[n] for n in trainable if n.endswith("bias") or params[n].dim() <= 1]
        groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if sharded:  # DeepSpeed drops empty groups from the optimizer, and the scheduler needs one lr per group
            groups = [group for group in groups if group["params"]]
        optimizer = torch.optim.AdamW(groups, lr=spec.lr)
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
        latest = latest_checkpoint(ckpt) if self.resume else None
        restart = f"delete {ckpt} to restart the stage {spec.name} from its beginning"
        if latest is not None:
            state = _load_state(latest / "state.pt", restart)
            written_by = (state.get("engine"), state.get("processes", 1))
            if written_by != (sharded, acc.num_processes):
                raise ValueError(f"{latest}: the checkpoint was written by {describe_launch(*written_by)}, this run "
                                 f"is {describe_launch(sharded, acc.num_processes)}; resume it as it was launched, "
                                 f"or {restart}")
            if not sharded:  # the engine's own checkpoint; a sharded one is loaded once the model is prepared
                model.load_state_dict(load_weights(latest / "model.safetensors", "the checkpoint's weights",
                                                   restart), strict=True)
                optimizer.load_state_dict(state["optimizer"])
                _set_rng_state(state["rng"])
            scheduler.load_state_dict(state["scheduler"])
            start_step = state["step"]

        if sharded and sharded.startswith("FSDP"):
            # accelerate's FSDP plugin keeps the layer classes it wrapped in the first model it prepared; each stage
            # wraps its own model's (dense CLIPEncoderLayer for MCL stages, CLIPMoEEncoderLayer for MoE stages)
            plugin = acc.state.fsdp_plugin
            if self._fsdp_wrap is None:
                self._fsdp_wrap = (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap)
            plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = self._fsdp_wrap
        ddp_model, optimizer = acc.prepare(trained_model, optimizer)
        ddp_model.train()
        if latest is not None and sharded:
            try:  # accelerate's own format: every process's shards of the model and optimizer, and its RNG states
                acc.load_state(str(latest))
            except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
                raise ValueError(f"{latest}: cannot read the checkpoint ({type(err).__name__}: {err}); "
                                 f"{restart}") from None
            # the next optimizer step runs at the schedule's learning rate of the step it continues from
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        if latest is not None:
            acc.print(f"[{spec.name}] resumed at step {start_step}/{total_steps} from {latest}")
        if sharded:
            acc.print(f"[{spec.name}] {sharded}: parameters and optimizer state sharded over {acc.num_processes} "
                      "processes (a checkpoint holds every process's shards: resume under the same launch)")
        rewind = getattr(self.log, "rewind", None)
        if rewind is not None and acc.is_main_process:
            rewind(spec.name, start_step, steps_per_epoch)  # lines written after the checkpoint go
        acc.wait_for_everyone()
        acc.print(f"[{spec.name}] {len(trainable)} trainable tensors "
                  f"({sum(params[n].numel() for n in trainable):,} weights), {total_steps} steps; "
                  f"batches: {sampler.stats.summary(sampler.leftover)}")
        bar = tqdm(total=total_steps, initial=start_step, desc=spec.name, disable=not acc.is_main_process,
                   dynamic_ncols=True)
        step = start_step
        last = {}
        epoch_metrics: list[dict] = []

        def end_epoch(epoch: int) -> None:  # 1-based
            if on_epoch_end is None:
                return
            record = on_epoch_end(epoch, acc.unwrap_model(ddp_model))
            if record:
                epoch_metrics.append({"epoch": epoch, **record})
                self.log({"stage": spec.name, "epoch_end": epoch, **record})

        if start_step and start_step % steps_per_epoch == 0:
            # the checkpoint of an epoch's last step is written before that epoch's end-of-epoch probe
            end_epoch(start_step // steps_per_epoch)
        for epoch in range(start_step // steps_per_epoch, spec.epochs):
            sampler.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)
            for batch in self.loader(sampler):
                t0 = time.perf_counter()
                self._note_skips(batch)
                if skip_together(acc, batch["input_ids"].shape[0] == 0):
                    # no readable image in this batch (on some process): the step passes without an update,
                    # so the schedule and the step count stay those of the data
                    scheduler.step()
                    record = {"skipped_batch": "no readable image (on at least one process)"}
                else:
                    losses = self._step(ddp_model, batch, spec, model_scale)
                    acc.backward(losses["loss"])
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    n = batch["pixel_values"].shape[0] * acc.num_processes
                    last = {k: float(v.detach()) for k, v in losses.items()}
                    rate = n / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", samples_s=f"{rate:.0f}")
                    record = {"samples_per_s": rate, **last}
                step += 1
                self.total_steps_done += 1
                bar.update(1)
                self.log({"stage": spec.name, "step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                          **record})
                if step % self.save_every == 0 and step < total_steps:
                    self._checkpoint(model, optimizer, scheduler, step, ckpt, sharded)
                if self.stop_after_steps is not None and self.total_steps_done >= self.stop_after_steps:
                    self._checkpoint(model, optimizer, scheduler, step, ckpt, sharded)
                    bar.close()
                    raise StopRequested(f"stopped after {self.total_steps_done} steps (--stop-after-steps)")
            end_epoch(epoch + 1)
        bar.close()
        if sharded:
            full = acc.get_state_dict(ddp_model)  # every process takes part; the main one gets the full weights
            ddp_model = optimizer = None
            acc.free_memory()  # drops accelerate's references to the prepared copy (and DeepSpeed's engine)
        else:
            model = acc.unwrap_model(ddp_model)
        for p in model.parameters():
            p.requires_grad_(False)
        summary = {"stage": spec.name, "steps": total_steps, "final": last, "epoch_metrics": epoch_metrics,
                   "batches": sampler.stats.summary(sampler.leftover), "cluster_sizes": sampler.stats.cluster_sizes}
        if acc.is_main_process:
            if sharded:
                full.update({name: full[name].reshape(()) for name in scalars})  # back to the model's shape
                model.load_state_dict(full, strict=True)
            stage_dir.mkdir(parents=True, exist_ok=True)
            _save_weights(model, stage_dir / "model.safetensors")
            atomic_write_text(done, json.dumps(summary, indent=1))  # last: marks the weights complete
            shutil.rmtree(ckpt, ignore_errors=True)  # the finished stage loads from its result, not a checkpoint
        acc.wait_for_everyone()
        if sharded and not acc.is_main_process:  # the other processes read the weights the main one wrote
            model.load_state_dict(load_weights(stage_dir / "model.safetensors", f"the weights of stage {spec.name}",
                                               again), strict=True)
        return model, summary

    def _step(self, model, batch, spec: StageSpec, model_scale: torch.Tensor | None = None) -> dict:
        acc = self.acc
        pixel_values = batch["pixel_values"].to(acc.device)
        input_ids = batch["input_ids"].to(acc.device)
        kwargs = {"output_router_logits": True} if spec.router_losses else {}
        with acc.autocast():
            out = model(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
        core = acc.unwrap_model(model)
        # learned, the model's own (frozen) scale when no temperature is given, or the fixed 1/temperature
        use_model_scale = spec.learn_temperature or spec.temperature is None
        if model_scale is not None:  # FSDP / DeepSpeed: the frozen scale, read before the model was sharded
            scale = model_scale
        else:
            scale = core.logit_scale.exp() if use_model_scale else 1.0 / spec.temperature
        clip = clip_contrastive_loss(out.image_embeds, out.text_embeds, scale, spec.label_smoothing,
                                     gather=gather_with_grad, normalize=True)
        losses = {"clip_loss": clip, "loss": clip}
        aux = getattr(out, "aux_loss", None) if spec.router_losses else None
        if aux is not None:  # the model weighs its router losses by its config's coefficients
            losses["aux_loss"] = aux
            losses["loss"] = clip + aux
        return losses

    def _checkpoint(self, model, optimizer, scheduler, step: int, ckpt: Path, sharded: str | None) -> None:
        """Writes ``ckpt/step-N`` (weights, optimizer, scheduler, RNG, step, and how the run was launched) as a
        whole, then drops older ones. Under FSDP / DeepSpeed every process writes its shards of the prepared model
        and optimizer and its RNG states through accelerate's ``save_state``."""
        acc = self.acc
        final = ckpt / f"step-{step:08d}"
        if final.is_dir():  # stop_after_steps may ask again for the step just saved
            return
        tmp = _tmp(final)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        state = {"scheduler": scheduler.state_dict(), "step": step, "engine": sharded,
                 "processes": acc.num_processes}
        if sharded:
            acc.save_state(str(tmp))
        elif acc.is_main_process:
            core = acc.unwrap_model(model)
            save_file({k: v.contiguous() for k, v in core.state_dict().items()}, tmp / "model.safetensors")
            state |= {"optimizer": optimizer.state_dict(), "rng": _rng_state()}
        acc.wait_for_everyone()
        if acc.is_main_process:
            torch.save(state, tmp / "state.pt")
            os.replace(tmp, final)  # weights and state appear together
            for old in ckpt.iterdir():  # older checkpoints and leftovers of a killed write
                if old != final:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
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
    evaluation library's keys (``i2t_R@1`` ...), ``n``, and each recall's binomial standard error
    (``i2t_R@1/se`` ...; the evaluation library's `standard_errors`)."""
    if len(image) == 0:
        return {}
    from clipmoe_vlm.evaluation import standard_errors
    from clipmoe_vlm.evaluation.encoder import retrieval_metrics

    metrics = retrieval_metrics(image, text, list(range(len(image))), ks=(1, 5))
    errors = standard_errors({"pairs": {**metrics, "num_images": len(image), "num_texts": len(text)}})
    return {**{key: round(value, 4) for key, value in metrics.items()}, "n": len(image),
            **{f"{key.removeprefix('pairs/')}/se": round(value, 4) for key, value in errors.items()}}
