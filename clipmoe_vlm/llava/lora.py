"""LoRA / QLoRA on the language model of a LLaVA model, saving adapters, and merging them into a full folder.

A LoRA run's output folder holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``: peft's adapter (LoRA on the language model only,
  targets `clipmoe_vlm.llava.trainable.LM_LORA_TARGETS`); ``base_model_name_or_path`` is the full LLaVA folder the
  run started from;
- ``non_lora_trainables.safetensors``: every other trained parameter (the projector; routers / experts when they
  were trained), keyed by their names in ``LlavaForConditionalGeneration``;
- the processor files and a README.md model card.

`merge_lora` (``scripts/merge_lora.py``) turns that into a standard full LLaVA folder; the merge does not depend
on folder names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoProcessor, BitsAndBytesConfig, LlavaForConditionalGeneration

from .builder import check_llava_folder

# Not from .trainer: trainer imports this module (NON_LORA_FILE, non_lora_state), so the shared rules live in
# .trainable and the dependency stays one-way.
from .trainable import LM_LORA_TARGETS, parameter_group_of

__all__ = [
    "NON_LORA_FILE",
    "QUANT_SKIP_MODULES",
    "apply_lora",
    "load_lora_llava",
    "merge_lora",
    "non_lora_state",
    "quantization_config",
    "save_lora",
]

NON_LORA_FILE = "non_lora_trainables.safetensors"

# transformers 5.x anchors skip patterns at the start of the full module name (or matches a suffix): bare
# "vision_tower" / "multi_modal_projector" no longer match, so the full paths are given.
QUANT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def quantization_config(bits: int, compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    """bitsandbytes config for QLoRA (4-bit NF4 with double quantisation, or 8-bit) that leaves the vision tower,
    the projector and ``lm_head`` unquantized."""
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    raise ValueError(f"bits must be 4 or 8 for quantized training, got {bits}")


def apply_lora(model: LlavaForConditionalGeneration, *, r: int = 128, alpha: int = 256, dropout: float = 0.05,
               target_modules: str = LM_LORA_TARGETS):
    """Wrap ``model`` with peft LoRA on the language model's linear layers (nothing in the tower or projector)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=target_modules,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    wrong = [name for name, _ in peft_model.named_parameters()
             if ".lora_" in name and parameter_group_of(name.split(".lora_")[0] + ".") != "language_model"]
    if wrong:
        raise RuntimeError(f"LoRA landed outside the language model: {wrong[:5]}")
    return peft_model


def _strip_peft_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")


def non_lora_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters that are not LoRA matrices, keyed by their ``LlavaForConditionalGeneration`` names."""
    return {_strip_peft_prefix(name): parameter.detach().cpu().contiguous()
            for name, parameter in peft_model.named_parameters()
            if parameter.requires_grad and ".lora_" not in name}


def save_lora(peft_model: nn.Module, output_dir: str | os.PathLike[str], *, base_folder: str | os.PathLike[str],
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save the adapter (``base_model_name_or_path`` = ``base_folder``) and the non-LoRA trainables."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(base_folder).resolve())
    peft_model.save_pretrained(output_dir, state_dict=state_dict)
    save_file(non_lora_state(peft_model), str(output_dir / NON_LORA_FILE))
    return output_dir


def _base_folder(adapter_dir: Path, base: str | os.PathLike[str] | None) -> Path:
    if base is not None:
        return Path(base)
    config_file = adapter_dir / "adapter_config.json"
    recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not recorded:
        raise ValueError(f"{config_file} records no base_model_name_or_path: pass --base (the base LLaVA folder)")
    return Path(recorded)


def load_lora_llava(adapter_dir: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                    dtype: torch.dtype | None = None, merge: bool = False):
    """Load a LoRA run's folder onto its base LLaVA folder (``base`` overrides the one recorded in the adapter).

    Returns ``(model, processor)``: a peft model, or with ``merge=True`` a plain ``LlavaForConditionalGeneration``.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or ``non_lora_trainables.safetensors`` in ``adapter_dir``, or
            no base folder.
        ValueError: the base folder is not a LLaVA folder, or the non-LoRA weights do not fit it.
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir} (not a LoRA output folder)")
    # Checked before loading anything: without it the merge would quietly keep the base projector.
    extra_path = adapter_dir / NON_LORA_FILE
    if not extra_path.is_file():
        raise FileNotFoundError(f"{extra_path} not found: a LoRA run saves the projector (and any trained routers "
                                f"/ experts) there next to the adapter; without it the base model's would be used")
    base_dir = _base_folder(adapter_dir, base)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"LoRA base folder {base_dir} has no config.json (pass --base)")
    check_llava_folder(base_dir, "LoRA base folder")
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = LlavaForConditionalGeneration.from_pretrained(base_dir, **kwargs)
    extra = load_file(str(extra_path))
    missing = sorted(set(extra) - set(model.state_dict()))
    if missing:
        raise ValueError(f"{extra_path}: keys not in the base model {base_dir}: {missing[:5]}")
    model.load_state_dict(extra, strict=False)
    model = PeftModel.from_pretrained(model, adapter_dir)
    if merge:
        model = model.merge_and_unload()
    model.eval()
    processor_dir = adapter_dir if (adapter_dir / "processor_config.json").is_file() else base_dir
    return model, AutoProcessor.from_pretrained(processor_dir)


def merge_lora(adapter_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
               base: str | os.PathLike[str] | None = None) -> Path:
    """Merge a LoRA run into a full LLaVA folder (model, processor, model card)."""
    model, processor = load_lora_llava(adapter_dir, base=base, merge=True)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    card = Path(adapter_dir) / "README.md"
    text = card.read_text() if card.is_file() else "# LLaVA\n"
    (output_dir / "README.md").write_text(
        text + f"\n\nMerged from the LoRA adapter `{Path(adapter_dir).resolve()}` onto "
        f"`{_base_folder(Path(adapter_dir), base).resolve()}` with `scripts/merge_lora.py`.\n")
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    """Entry point of ``scripts/merge_lora.py``."""
    import argparse
    import sys

    import clipmoe_vlm  # noqa: F401  (registers the CLIP-MoE tower)

    parser = argparse.ArgumentParser(description="Merge a LoRA LLaVA run into a full folder.")
    parser.add_argument("adapter", help="the LoRA run's output folder (adapter_config.json, adapter weights, "
                        f"{NON_LORA_FILE})")
    parser.add_argument("output", help="folder for the merged LLaVA model")
    parser.add_argument("--base", help="base LLaVA folder (default: the adapter's base_model_name_or_path)")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    out = merge_lora(args.adapter, args.output, base=args.base)  # bad inputs: one line from clipmoe_cli.main
    print(f"merged {args.adapter} -> {out}")
    return out
