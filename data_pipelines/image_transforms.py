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

JPEGs much larger than their target decode at 1/2, 1/4 or 1/8 scale in the DCT (PIL's
`draft`), never below the size that `transform` resizes to, then resize exactly as a full
decode would (benchmarks/image_decode.py: speed, and the pixels' distance from a full
decode). simplejpeg, where installed, decodes them at the same scale with the same
libjpeg-turbo: PIL's pixels, a few percent sooner; CMYK, and whatever it refuses, go to PIL.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes everything, a little slower
    simplejpeg = None

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
JPEG_FIELDS = ("jpg", "jpeg")
DECODERS = ("auto", "pil")  # auto: simplejpeg for JPEGs where installed
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


def image_field(sample: dict) -> str:
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        names = sorted(k for k in sample if not k.startswith("__"))
        raise KeyError(f"no image field ({'/'.join(IMAGE_FIELDS)}); the sample has {names}")
    return field


def load_image(sample: dict) -> Image.Image:
    """The sample's image, full size, in RGB."""
    return Image.open(io.BytesIO(sample[image_field(sample)])).convert("RGB")


def resized_size(w: int, h: int, size: tuple[int, int], t: ImageTransforms) -> tuple[int, int]:
    """(width, height) that `transform` resizes a w x h image to before cropping."""
    bw, bh = size
    if t.resize == "stretch":
        return bw, bh
    scale = max(bw / w, bh / h)
    if scale == 1:
        return w, h
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def dct_scale(w: int, h: int, fit: tuple[int, int]) -> int:
    """PIL's draft rule: the largest of 8, 4, 2, 1 that keeps a w x h JPEG >= `fit`."""
    q = min(w // fit[0], h // fit[1])  # 0 where the image is smaller than `fit`
    return next((s for s in (8, 4, 2) if q >= s), 1)


Decoded = tuple[Image.Image, tuple[int, int], int]  # RGB image, stored (width, height), DCT scale


def _simplejpeg_rgb(data: bytes, size: tuple[int, int], t: ImageTransforms) -> Decoded | None:
    """The JPEG at PIL's draft scale, or None where simplejpeg refuses it or would decode
    it otherwise than PIL (CMYK: PIL's conversion differs by 1)."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray"):
            return None
        s = dct_scale(w, h, resized_size(w, h, size, t))
        want = (-(-h // s), -(-w // s))  # libjpeg's scaled size rounds up
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=want[0], min_width=want[1])
    except ValueError:  # corrupt or odd: PIL's verdict is the one that counts
        return None
    if pixels.shape[:2] != want:
        return None
    return Image.fromarray(pixels), (w, h), s


def decode_rgb(sample: dict, size: tuple[int, int], t: ImageTransforms, decoder: str = "auto") -> Decoded:
    """The sample's image in RGB, no smaller than `transform` resizes it to: a JPEG at
    1/2, 1/4 or 1/8 scale where that is still large enough."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder '{decoder}' is not one of {DECODERS}")
    field = image_field(sample)
    data = sample[field]
    if decoder == "auto" and simplejpeg is not None and field in JPEG_FIELDS and data[:2] == b"\xff\xd8":
        fast = _simplejpeg_rgb(data, size, t)
        if fast is not None:
            return fast
    img = Image.open(io.BytesIO(data))
    original, s = img.size, 1
    if img.format in ("JPEG", "MPO"):
        fit = resized_size(*original, size, t)
        drafted = img.draft(None, fit) if dct_scale(*original, fit) > 1 else None
        if drafted is not None:  # None: a JPEG that PIL will not scale, decoded in full
            s = round(original[0] / drafted[1][2])
    return img.convert("RGB"), original, s


def transform(
    img: Image.Image,
    size: tuple[int, int],
    t: ImageTransforms,
    rng: np.random.Generator | None,
    stored: tuple[int, int] | None = None,
    dct: int = 1,
) -> tuple[Image.Image, ImageInfo]:
    """`img` brought to `size` = (width, height); `rng` draws the random choices (needed
    only for random crops and flips). A JPEG decoded at 1/`dct` scale (`decode_rgb`) says
    its `stored` (width, height): it resizes to what the full image would, from the part
    of its pixels that the full image's area maps to."""
    bw, bh = size
    w, h = stored or img.size
    original = (h, w)
    rw, rh = resized_size(w, h, size, t)
    if (rw, rh) != img.size or dct > 1:
        box = (0, 0, w / dct, h / dct) if dct > 1 else None
        img = img.resize((rw, rh), Image.BICUBIC, box=box)
    if t.resize == "stretch":
        top = left = 0
    else:
        if t.crop == "random":
            top, left = int(rng.integers(rh - bh + 1)), int(rng.integers(rw - bw + 1))
        else:
            top, left = (rh - bh) // 2, (rw - bw) // 2
        img = img.crop((left, top, left + bw, top + bh))
    flipped = bool(t.hflip > 0 and rng.random() < t.hflip)
    if flipped:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img, ImageInfo(original, (top, left), flipped)


def image_with_info(sample: dict, size: int, decoder: str = "auto") -> tuple[torch.Tensor, ImageInfo]:
    """(3, H, W) float in [-1, 1] and how it was made; (H, W) is the sample's bucket, else
    (size, size). decoder="pil" decodes with PIL only (benchmarks, tests)."""
    target = tuple(sample["__bucket__"]) if "__bucket__" in sample else (size, size)
    t = sample.get("__transforms__") or ImageTransforms()
    rng = None
    if t.crop == "random" or t.hflip > 0:
        rng = sample_rng(sample.get("__seed__", 0), sample.get("__epoch__", 0), sample.get("__key__", ""))
    img, stored, dct = decode_rgb(sample, target, t, decoder)
    img, info = transform(img, target, t, rng, stored, dct)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return pixels, info
