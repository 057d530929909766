"""Where a base CLIP comes from: ``--base`` specs resolved to a model object.

Accepted specs (the error for anything else lists them):

- ``tiny-random``: a tiny random transformers CLIP built from a config (smoke tests, no download);
- a local folder holding a transformers CLIP or CLIP-MoE (``config.json`` + weights), dispatched on its
  ``model_type`` through the Auto classes;
- ``open_clip:ARCH`` (random init), ``open_clip:ARCH:TAG`` (an open_clip pretrained tag; downloads) or
  ``open_clip:ARCH:FILE`` (a local checkpoint file);
- a ``.pt``/``.pth``/``.bin`` file in the OpenAI layout: a dense OpenAI/open_clip CLIP or the official CLIP-MoE
  release (experts detected from the keys), as a state dict (optionally wrapped as ``{"state_dict": ...}``) or a
  TorchScript archive (OpenAI's own CLIP files);
- any other string is taken as a Hugging Face hub id of a transformers CLIP (downloads; never used by tests).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel

from .configuration_clip_moe import CLIPMoEConfig
from .convert import SUPPORTED_SOURCES, load_official_clipmoe, open_clip_to_hf, openai_layout_to_hf, read_checkpoint

__all__ = ["BASE_SPECS", "load_clip", "tiny_clip_config"]

BASE_SPECS = (
    "tiny-random",
    "a local folder with a transformers CLIP or CLIP-MoE (config.json + safetensors)",
    "open_clip:ARCH[:PRETRAINED_TAG_OR_FILE]",
    ("a .pt/.pth/.bin OpenAI-layout state dict or TorchScript archive (OpenAI CLIP, open_clip, or the official "
     "CLIP-MoE release)"),
    "a Hugging Face hub id of a transformers CLIP",
)


def tiny_clip_config(image_size: int = 64, patch_size: int = 8, width: int = 64, layers: int = 4,
                     text_layers: int = 3, vocab_size: int = 49408, context_length: int = 64) -> CLIPConfig:
    """A small CLIP for CPU runs. The text side uses the OpenAI/open_clip BPE vocabulary (49408 tokens, EOT is
    the highest id, hence ``eos_token_id=2``: transformers' argmax pooling)."""
    return CLIPConfig(
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=max(1, width // 32), image_size=image_size, patch_size=patch_size),
        text_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers,
                         num_attention_heads=max(1, width // 32), vocab_size=vocab_size,
                         max_position_embeddings=context_length, eos_token_id=2, bos_token_id=vocab_size - 2,
                         pad_token_id=0),
        projection_dim=width,
        logit_scale_init_value=2.6592,
    )


def load_clip(spec: str, seed: int = 0):
    """Resolves a ``--base`` spec (see the module docstring) to a transformers CLIP or a `CLIPMoEModel`."""
    if spec == "tiny-random":
        torch.manual_seed(seed)
        return CLIPModel(tiny_clip_config())
    if spec.startswith("open_clip:"):
        return _load_open_clip(spec)
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--base {spec}: folder has no config.json; accepted: " + "; ".join(BASE_SPECS))
        config = AutoConfig.from_pretrained(path)
        if not isinstance(config, (CLIPConfig, CLIPMoEConfig)):
            raise ValueError(f"--base {spec}: config.json has model_type '{config.model_type}', expected 'clip' or "
                             "'clip_moe'")
        return AutoModel.from_pretrained(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        if not path.is_file():
            raise FileNotFoundError(f"--base {spec}: file not found")
        state = read_checkpoint(path, where=f"--base {spec}")
        if any(re.search(r"\.experts\.\d+\.c_fc\.weight$", key) for key in state):  # official CLIP-MoE release
            return load_official_clipmoe(state, source=str(path))
        config, hf_state = openai_layout_to_hf(state, source=str(path))
        model = CLIPModel(config)
        hf_state.update({k: v for k, v in model.state_dict().items() if k.endswith("position_ids")})
        model.load_state_dict(hf_state, strict=True)
        return model
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists():
        try:
            return CLIPModel.from_pretrained(spec)  # hub id: the user asked for a download
        except OSError as err:
            raise ValueError(f"--base {spec}: not a local folder or file, and loading it as a hub id failed: "
                             f"{err}") from None
    if not path.exists() and ("/" in spec or path.suffix):
        raise FileNotFoundError(f"--base {spec}: no such file or folder")
    raise ValueError(f"--base {spec!r} is not understood; accepted: " + "; ".join(BASE_SPECS)
                     + ". Supported model kinds: " + "; ".join(SUPPORTED_SOURCES))


def _load_open_clip(spec: str):
    import open_clip

    parts = spec.split(":", 2)
    arch = parts[1]
    pretrained = parts[2] if len(parts) == 3 else None
    if arch not in open_clip.list_models():
        raise ValueError(f"--base {spec}: unknown open_clip architecture '{arch}'")
    if pretrained and (pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or "/" in pretrained) \
            and not Path(pretrained).is_file():
        raise FileNotFoundError(f"--base {spec}: checkpoint file '{pretrained}' not found")
    model = open_clip.create_model(arch, pretrained=pretrained)
    return open_clip_to_hf(model)
