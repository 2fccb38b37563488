"""Sample bytes as model input: an image field decoded, resized on its shorter side and center cropped."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def fields(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def image_tensor(sample: dict, size: int) -> torch.Tensor:
    """(3, size, size) float in [-1, 1] from the sample's image bytes."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise KeyError(f"no image field ({'/'.join(IMAGE_FIELDS)}); the sample has {fields(sample)}")
    img = Image.open(io.BytesIO(sample[field])).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    if scale != 1:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1], clamped."""
    return (images.float() / 2 + 0.5).clamp(0, 1)
