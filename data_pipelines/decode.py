"""Sample bytes as model input: an image field decoded, resized and cropped to its size."""

from __future__ import annotations

import torch

from data_pipelines.image_transforms import IMAGE_FIELDS, image_with_info

__all__ = ["IMAGE_FIELDS", "fields", "image_tensor", "to_unit"]


def fields(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def image_tensor(sample: dict, size: int) -> torch.Tensor:
    """(3, H, W) float in [-1, 1] from the sample's image bytes: size x size, or the
    sample's `__bucket__`, through the recipe's `__transforms__` when the stream gave them
    (data_pipelines.image_transforms; without them: scaled to cover, center cropped)."""
    return image_with_info(sample, size)[0]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1], clamped."""
    return (images.float() / 2 + 0.5).clamp(0, 1)
