"""LLaVA training on transformers' ``Trainer``: parameter groups with their own learning rates, the MoE auxiliary loss.

- Which parameters train (`configure_trainable`) and which group each belongs to (`parameter_group_of`) is decided
  in `clipmoe_vlm.llava.trainable`.
- `LlavaTrainer` adds to ``Trainer``: parameter groups with their own learning rates (projector, router,
  experts), LLaVA's ``group_by_modality_length`` sampler, and a ``compute_loss`` that

  * runs the vision tower itself (``output_router_logits=True`` when the router or experts train) and hands the
    features to the model through ``mm_encoder_outputs``, so the MoE load-balancing / z-loss of the tower
    (the tower output's ``aux_loss``, weighted by the tower config's coefficients) is added to the
    language-model loss; both are logged separately (``lm_loss``, ``aux_loss``);
  * feeds a batch without images a zero dummy image through tower and projector and adds ``0 *`` its features,
    as LLaVA does, so that DDP / ZeRO-3 see every trainable parameter used on every rank; the dummy image is
    never part of the routing statistics (no aux loss is computed from it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaForConditionalGeneration, Trainer

from ..data.llava_batching import ModalityLengthGroupedSampler
from ..distributed import sharded_engine
from ..modeling_clip_moe import tower_aux_loss

# The dependency runs one way, trainer -> lora -> trainable: lora never imports this module (it would pull in the
# Trainer machinery, which merging an adapter does not need).
from .lora import NON_LORA_FILE, non_lora_state, save_lora
from .run_folder import write_checkpoint_record
from .trainable import parameter_group_of, tower_layers_in_use

__all__ = ["LlavaTrainer", "llava_core", "mark_zero3_leaf_blocks"]


def llava_core(model: nn.Module):
    """The ``LlavaModel`` inside a (possibly peft-, DDP- or DeepSpeed-wrapped) ``LlavaForConditionalGeneration``."""
    current = model
    for _ in range(6):
        if isinstance(current, LlavaForConditionalGeneration):
            return current.model
        if hasattr(current, "get_base_model"):  # peft
            current = current.get_base_model()
        elif hasattr(current, "module"):  # DDP / DeepSpeed engine
            current = current.module
        else:
            break
    raise TypeError(f"expected a LlavaForConditionalGeneration (possibly wrapped), got {type(model).__name__}")


def mark_zero3_leaf_blocks(model: nn.Module) -> int:
    """For DeepSpeed ZeRO-3: makes each frozen ``CLIPMoESparseBlock`` of ``model`` one ZeRO-3 leaf; returns how many.

    A leaf's parameters (router and every expert) are gathered once when the block starts, so no rank waits on a
    sub-module that another rank did not call. Blocks with a trainable parameter (routers or experts training)
    stay ordinary modules: DeepSpeed 0.19's leaf hooks release a leaf's parameters before their gradients are
    accumulated when the block's input does not require grad, which is the case behind a frozen patch embedding
    (checked in ``tests/test_scaleout.py``). Those blocks are safe without it: the experts are stacked tensors of one
    module, so every rank gathers the same parameters. Call before the model is prepared; needs ``deepspeed``."""
    from ..moe import CLIPMoESparseBlock

    blocks = [m for m in model.modules() if isinstance(m, CLIPMoESparseBlock)]
    if not blocks or any(p.requires_grad for block in blocks for p in block.parameters()):
        return 0
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, [CLIPMoESparseBlock])
    return len(blocks)


def _ordinary_save_renamings(model: nn.Module) -> None:
    """Under ZeRO-3, transformers 5.25 records its legacy key renamings too when ``from_pretrained`` loads a LLaVA
    folder, and ``save_pretrained`` reverses them all: the language model would be saved as
    ``language_model.model.model.*``, which no load maps back (found by ``tests/test_scaleout.py``). The model is
    given the renamings an ordinary load records."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_weight_conversions", None) is not None:
        base._weight_conversions = get_model_conversion_mapping(base, add_legacy=False)


def _non_lora_trainables(peft_model: nn.Module, state_dict: dict | None) -> dict[str, torch.Tensor]:
    """`non_lora_state`, read from ``state_dict`` (the gathered full weights under FSDP / ZeRO-3) when given."""
    if state_dict is None:
        return non_lora_state(peft_model)
    names = {name for name, parameter in peft_model.named_parameters()
             if parameter.requires_grad and ".lora_" not in name}
    return {name.removeprefix("base_model.model."): state_dict[name].detach().cpu().contiguous() for name in names}


def _router_losses_in_use(features, tower_config, in_use: int | None):
    """The tower's weighted router losses (its config's coefficients) over the MoE layers whose output reaches the
    projector: the statistics of a layer nothing reads (LLaVA-1.5's last) would only push the layers before it to
    balance routing there."""
    logits = getattr(features, "router_logits", None)  # one per MoE layer, in layer order
    if not logits:
        return None
    if in_use is not None:
        logits = tuple(layer_logits for layer_logits, layer in zip(logits, tower_config.moe_layer_indices())
                       if layer < in_use)
    return tower_aux_loss(logits, tower_config)


class LlavaTrainer(Trainer):
    """``Trainer`` for LLaVA (see the module docstring).

    Args (besides ``Trainer``'s):
        group_lrs: learning rate per parameter group (`parameter_group_of`), e.g. ``{"projector": 2e-5}``;
            groups not listed use ``args.learning_rate``.
        aux_loss: add the vision tower's MoE auxiliary loss (with its config's coefficients).
        group_by_modality_length: use `ModalityLengthGroupedSampler` over ``train_dataset.modality_lengths``.
    """

    def __init__(self, *args, group_lrs: dict[str, float] | None = None, aux_loss: bool = False,
                 group_by_modality_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_lrs = dict(group_lrs or {})
        self.aux_loss = aux_loss
        self.group_by_modality_length = group_by_modality_length
        # compute_loss returns per-batch means (LM loss and aux loss alike); the Trainer scales them for
        # gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self._running: dict[str, list[float]] = {"lm_loss": [], "aux_loss": []}
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        if plugin is not None and plugin.zero_stage == 3:
            mark_zero3_leaf_blocks(self.model)  # before DeepSpeed registers its hooks (in train)
            _ordinary_save_renamings(self.model)

    # ------------------------------------------------------------------ optimiser
    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, parameter in opt_model.named_parameters():
            if not parameter.requires_grad:
                continue
            lr = self.group_lrs.get(parameter_group_of(name), self.args.learning_rate)
            weight_decay = self.args.weight_decay if name in decay else 0.0
            groups.setdefault((lr, weight_decay), []).append(parameter)
        param_groups = [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ sampler
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_modality_length and hasattr(dataset, "modality_lengths"):
            return ModalityLengthGroupedSampler(
                dataset.modality_lengths, batch_size=self.args.train_batch_size, world_size=self.args.world_size,
                gradient_accumulation_steps=self.args.gradient_accumulation_steps, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        core = llava_core(model)
        inputs = dict(inputs)
        pixel_values = inputs.pop("pixel_values", None)
        tower = core.vision_tower
        routed = self.aux_loss and model.training and hasattr(tower.config, "num_experts")
        dummy = pixel_values is None
        if dummy:
            size = tower.config.image_size
            pixel_values = torch.zeros(1, 3, size, size, device=inputs["input_ids"].device)
        pixel_values = pixel_values.to(dtype=tower.embeddings.patch_embedding.weight.dtype)
        extra = {"output_router_logits": True} if routed and not dummy else {}
        if self.is_fsdp_enabled:
            # FSDP gathers the parameters of the wrapped model's own shard group (embeddings, norms, projector) only
            # inside its forward, which must also come first: the tower runs there, from a pre-hook of the LLaVA core
            captured = {}

            def tower_first(module, args, kwargs):
                captured["features"] = module.get_image_features(pixel_values=pixel_values, return_dict=True, **extra)
                if not dummy:
                    kwargs["mm_encoder_outputs"] = {"image": captured["features"]}
                return args, kwargs

            handle = core.register_forward_pre_hook(tower_first, with_kwargs=True)
            try:
                outputs = model(**inputs)
            finally:
                handle.remove()
            features = captured["features"]
        else:
            features = core.get_image_features(pixel_values=pixel_values, return_dict=True, **extra)
            outputs = model(**inputs) if dummy else model(**inputs, mm_encoder_outputs={"image": features})
        if dummy:
            zero = sum(feature.sum() for feature in features.pooler_output) * 0.0
            lm_loss = outputs.loss + zero.to(outputs.loss.dtype)
        else:
            lm_loss = outputs.loss
        loss = lm_loss
        aux = None
        if routed and not dummy:
            aux = _router_losses_in_use(features, tower.config, tower_layers_in_use(core.config))
            if aux is not None:
                loss = loss + aux.to(loss.dtype)
        if model.training:
            self._running["lm_loss"].append(float(lm_loss.detach()))
            if aux is not None:
                self._running["aux_loss"].append(float(aux.detach()))
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if hasattr(model, "peft_config") and self.args.should_save:
            # peft saves only the LoRA matrices; the projector (and routers) train too and must come back on resume
            save_file(_non_lora_trainables(model, state_dict),
                      os.path.join(output_dir or self.args.output_dir, NON_LORA_FILE))

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        super()._save_checkpoint(model, trial)
        # every process has written its files of checkpoint-N in place: only now is it whole (see run_folder)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            write_checkpoint_record(folder, self.state.global_step, sharded_engine(self.accelerator),
                                    self.accelerator.num_processes)

    def save_lora_run(self, output_dir: str | os.PathLike[str], base_folder: str | os.PathLike[str]) -> None:
        """`save_lora` of the trained peft model. Under FSDP or DeepSpeed ZeRO-3 each process holds a shard of
        every weight: all processes gather the full weights, and the main process writes them."""
        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled
                                           and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        state_dict = self.accelerator.get_state_dict(self.deepspeed if self.is_deepspeed_enabled else self.model) \
            if sharded else None
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if state_dict is None:
                save_lora(model, output_dir, base_folder=base_folder)
            else:  # what save_lora writes, from the gathered weights (its parameters are shards here)
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                model.peft_config["default"].base_model_name_or_path = str(Path(base_folder).resolve())
                model.save_pretrained(output_dir, state_dict=state_dict)
                save_file(_non_lora_trainables(model, state_dict), os.path.join(output_dir, NON_LORA_FILE))
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restores the weights of a checkpoint.

        ``save_pretrained`` (transformers 5.23) writes LLaVA checkpoints in the original key layout
        (``language_model.model.*``, ``vision_tower.*``), which only ``from_pretrained`` maps back; the Trainer's own
        ``load_state_dict(strict=False)`` would silently load nothing. Full models are therefore reloaded with
        ``from_pretrained`` and copied strictly; peft models get their adapter (Trainer) plus the non-LoRA
        trainables. Under FSDP the checkpoint holds the wrapped model's whole state (``pytorch_model_fsdp*``, the
        module's own key names), which the Trainer loads into the sharded parameters itself; copying plain tensors
        into them would fail."""
        model = self.model if model is None else model
        if self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        folder = Path(resume_from_checkpoint)
        if hasattr(unwrapped, "peft_config"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            extra_file = folder / NON_LORA_FILE
            if extra_file.is_file():
                extra = load_file(str(extra_file))
                base = unwrapped.get_base_model()
                result = base.load_state_dict(extra, strict=False)
                if result.unexpected_keys:
                    raise KeyError(f"{extra_file}: keys not in the model: {result.unexpected_keys[:5]}")
            return
        if not isinstance(unwrapped, LlavaForConditionalGeneration):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        dtype = next(unwrapped.parameters()).dtype
        loaded = type(unwrapped).from_pretrained(folder, dtype=dtype)
        unwrapped.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for key, values in self._running.items():
                if values:
                    logs[key] = round(sum(values) / len(values), 6)
                    values.clear()
        super().log(logs, start_time)

