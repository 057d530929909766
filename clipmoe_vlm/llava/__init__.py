"""LLaVA-1.5 with a CLIP-MoE (or dense CLIP) vision tower, on transformers' ``LlavaForConditionalGeneration``.

- `build_llava` (`clipmoe_vlm.llava.builder`): vision tower + causal LM + tokenizer -> a LLaVA model and processor.
- `clipmoe_vlm.llava.train`: the two-stage training command (``scripts/train_llava.py``), imported on demand.
- `clipmoe_vlm.llava.inference`: greedy answering (``scripts/llava_infer.py``).
- `clipmoe_vlm.llava.trainer`: ``LlavaTrainer``; `clipmoe_vlm.llava.trainable`: `configure_trainable` (which
  parameters train per stage).
- `clipmoe_vlm.llava.lora`: LoRA / QLoRA helpers and the LoRA merge (``scripts/merge_lora.py``).
- `clipmoe_vlm.llava.shapes_eval`: per-question-type accuracy on held-out Shapes questions.

Importing this package loads only the builder (no argparse, no peft, no DeepSpeed).
"""

from .builder import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    build_llava,
    build_processor,
    load_language_model,
    load_llava,
    load_vision_tower,
    num_image_tokens,
)

__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "build_llava",
    "build_processor",
    "load_language_model",
    "load_llava",
    "load_vision_tower",
    "num_image_tokens",
]
