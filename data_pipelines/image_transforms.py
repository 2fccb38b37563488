"""An image's way from its bytes to its training size: resize, crop, flip.

A workload's decode calls `image_with_info(sample, size)`. The target is the sample's
`__bucket__` (width, height) when the stream buckets by aspect ratio, else size x size.
The recipe's choices (data.transforms) come with the sample as `__transforms__`; the
random ones (crop offsets, flip) are drawn from a generator seeded by (`__seed__`,
`__epoch__`, `__key__`): the same pixels for a sample in an epoch whatever the ranks,
workers or restarts, new ones in the next epoch. Without them (eval splits, tools) an
image is scaled to cover and center cropped, never flipped.

The crop's (top, left) in the resized image and the original (height, width) come back
with the pixels, for SDXL-style size and crop conditioning; feeding them to a model is
the model's business.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
RESIZES = ("cover", "stretch")
CROPS = ("center", "random")


@dataclass(frozen=True)
class ImageTransforms:
    resize: str = "cover"  # cover: scale to cover the target, then crop | stretch: scale to it exactly
    crop: str = "center"  # center | random (cover only)
    hflip: float = 0.0  # probability of a horizontal flip

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise ValueError(f"resize '{self.resize}' is not one of {RESIZES}")
        if self.crop not in CROPS:
            raise ValueError(f"crop '{self.crop}' is not one of {CROPS}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip {self.hflip} is not a probability")


@dataclass(frozen=True)
class ImageInfo:
    original_size: tuple[int, int]  # (height, width) of the stored image
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    flipped: bool


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one sample's random choices in one epoch."""
    digest = int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([int(seed), int(epoch), digest])


def load_image(sample: dict) -> Image.Image:
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        names = sorted(k for k in sample if not k.startswith("__"))
        raise KeyError(f"no image field ({'/'.join(IMAGE_FIELDS)}); the sample has {names}")
    return Image.open(io.BytesIO(sample[field])).convert("RGB")


def transform(
    img: Image.Image, size: tuple[int, int], t: ImageTransforms, rng: np.random.Generator | None
) -> tuple[Image.Image, ImageInfo]:
    """`img` brought to `size` = (width, height); `rng` draws the random choices (needed
    only for random crops and flips)."""
    bw, bh = size
    w, h = img.size
    original = (h, w)
    if t.resize == "stretch":
        if (w, h) != (bw, bh):
            img = img.resize((bw, bh), Image.BICUBIC)
        top = left = 0
    else:
        scale = max(bw / w, bh / h)
        if scale != 1:
            img = img.resize((max(bw, round(w * scale)), max(bh, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        if t.crop == "random":
            top, left = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
        else:
            top, left = (h - bh) // 2, (w - bw) // 2
        img = img.crop((left, top, left + bw, top + bh))
    flipped = bool(t.hflip > 0 and rng.random() < t.hflip)
    if flipped:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img, ImageInfo(original, (top, left), flipped)


def image_with_info(sample: dict, size: int) -> tuple[torch.Tensor, ImageInfo]:
    """(3, H, W) float in [-1, 1] and how it was made; (H, W) is the sample's bucket, else
    (size, size)."""
    target = tuple(sample["__bucket__"]) if "__bucket__" in sample else (size, size)
    t = sample.get("__transforms__") or ImageTransforms()
    rng = None
    if t.crop == "random" or t.hflip > 0:
        rng = sample_rng(sample.get("__seed__", 0), sample.get("__epoch__", 0), sample.get("__key__", ""))
    img, info = transform(load_image(sample), target, t, rng)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return pixels, info
