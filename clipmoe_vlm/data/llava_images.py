"""LLaVA-1.5 image handling: open as RGB, pad to square with the processor's mean colour, preprocess.

What to do with a missing or unreadable file (skip the sample, count it) is the dataset's decision, so
:func:`open_rgb` only raises and :data:`UNREADABLE_IMAGE_ERRORS` lists what it may raise for a bad file.
"""

from __future__ import annotations

import os

import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor

__all__ = ["UNREADABLE_IMAGE_ERRORS", "expand_to_square", "open_rgb", "pad_colour", "preprocess_image"]

# What PIL raises for a truncated, corrupt or oversized file (as opposed to a bug in the caller).
UNREADABLE_IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError,
                                                              Image.DecompressionBombError)


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad ``image`` to a square canvas of ``background`` colour, centred (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def pad_colour(image_processor: BaseImageProcessor) -> tuple[int, ...]:
    """The processor's ``image_mean`` as 0-255 integers: LLaVA pads with it so padding normalises to ~0.

    Raises:
        ValueError: the processor has no ``image_mean``.
    """
    mean = getattr(image_processor, "image_mean", None)
    if mean is None:
        raise ValueError("image_aspect_ratio='pad' needs an image_processor with image_mean")
    return tuple(int(value * 255) for value in mean)


def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Read ``path`` fully into memory as RGB (the file is closed on return); raises `UNREADABLE_IMAGE_ERRORS`."""
    with Image.open(path) as opened:
        return opened.convert("RGB")


def preprocess_image(image: Image.Image, image_processor: BaseImageProcessor,
                     background: tuple[int, ...] | None) -> torch.Tensor:
    """``3 x H x W`` pixel values of one image; padded to square first when ``background`` is given."""
    if background is not None:
        image = expand_to_square(image, background)
    pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(pixel_values)[0]
