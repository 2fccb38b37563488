"""Aspect-ratio buckets: which batch shape a sample belongs to, read from cheap metadata.

A bucket is a (width, height) in pixels. An image goes to the bucket nearest its aspect
ratio (distance |log(w/h) - log(bw/bh)|; a tie goes to the bucket nearest its area, then
to the first in the list), and is later resized to cover the bucket and cropped to it
(data_pipelines.image_transforms). The stream groups samples by bucket so that every
batch has one shape (data_pipelines.stream, "Buckets").

The size is read without decoding pixels: from the image header (PIL parses only the
header until asked for pixels), else from a `json` record's width/height. Precomputed
latents (`latent.npy`) were cropped when they were made: they are grouped by their exact
array shape, read from the .npy header.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
LATENT_FIELD = "latent.npy"


def generate_buckets(
    *, area: int, step: int, min_side: int = 0, max_side: int = 0, max_ratio: float = 2.0
) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, each as large as fits in `area` pixels,
    sides in [min_side, max_side] (0: step, and no bound beyond `max_ratio`), aspect ratio
    at most `max_ratio` either way; ordered from the tallest to the widest."""
    if area <= 0 or step <= 0:
        raise ValueError(f"area ({area}) and step ({step}) must be > 0")
    lo = max(step, min_side)
    hi = max_side if max_side > 0 else int(math.sqrt(area * max_ratio))
    found = set()
    for width in range(step * -(-lo // step), hi + 1, step):
        height = (area // width) // step * step
        if height < lo or height > hi:
            continue
        if max(width / height, height / width) > max_ratio + 1e-9:
            continue
        found.add((width, height))
    if not found:
        raise ValueError(f"no bucket fits area={area}, step={step}, sides {lo}..{hi}, max_ratio={max_ratio}")
    return sorted(found, key=lambda wh: wh[0] / wh[1])


def image_size(sample: dict) -> tuple[int, int]:
    """(width, height) of the sample's image, without decoding its pixels."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is not None:
        with Image.open(io.BytesIO(sample[field])) as img:
            return img.size
    if "json" in sample:
        record = json.loads(sample["json"])
        if isinstance(record, dict) and "width" in record and "height" in record:
            return int(record["width"]), int(record["height"])
    names = sorted(k for k in sample if not k.startswith("__"))
    raise KeyError(f"no image field ({'/'.join(IMAGE_FIELDS)}) and no json width/height; the sample has {names}")


def latent_shape(data: bytes) -> tuple[int, ...]:
    """The array shape in a .npy file's header."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, _ = read(f)
    return tuple(int(n) for n in shape)


@dataclass(frozen=True)
class Buckets:
    sizes: tuple[tuple[int, int], ...]  # (width, height)

    def __post_init__(self):
        if not self.sizes:
            raise ValueError("no buckets")
        for w, h in self.sizes:
            if w <= 0 or h <= 0:
                raise ValueError(f"bucket [{w}, {h}]: sides must be > 0")

    def nearest(self, width: int, height: int) -> tuple[int, int]:
        """The bucket for an image of this size (deterministic)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width}x{height}")
        ratio, area = math.log(width / height), math.log(width * height)

        def distance(i: int):
            bw, bh = self.sizes[i]
            return (round(abs(ratio - math.log(bw / bh)), 9), abs(area - math.log(bw * bh)), i)

        return self.sizes[min(range(len(self.sizes)), key=distance)]

    def group_of(self, sample: dict) -> tuple[str, tuple[int, int] | None]:
        """(group name, bucket) of a raw sample: 'WxH' and (W, H) for an image; for a
        precomputed latent 'latent:CxHxW' and no bucket (its shape is already final)."""
        if LATENT_FIELD in sample:
            return "latent:" + "x".join(map(str, latent_shape(sample[LATENT_FIELD]))), None
        w, h = self.nearest(*image_size(sample))
        return f"{w}x{h}", (w, h)

    def signature(self) -> list[list[int]]:
        return [list(s) for s in self.sizes]

    def histogram(self, samples) -> dict[str, int]:
        """Samples per group of an iterable of raw samples (for tools and tests)."""
        counts: dict[str, int] = {}
        for sample in samples:
            group, _ = self.group_of(sample)
            counts[group] = counts.get(group, 0) + 1
        return counts
