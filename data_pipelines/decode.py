"""Sample bytes as model input: an image field decoded, resized and cropped to its size."""

from __future__ import annotations

import ast
import math

import numpy as np
import torch

from data_pipelines.image_transforms import IMAGE_FIELDS, image_with_info

__all__ = ["IMAGE_FIELDS", "fields", "image_tensor", "npy_array", "to_unit"]


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


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}


def npy_array(data: bytes) -> np.ndarray:
    """The array of a `.npy` field (np.save's bytes), read-only and without a copy: np.load
    parses the header dict on every call, ~10x the cost of the read for a small array; samples
    of one dataset share one header, parsed here once."""
    if data[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy field (no \\x93NUMPY magic)")
    if data[6] == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
    else:
        start = 12 + int.from_bytes(data[8:12], "little")
    header = data[:start]
    parsed = _npy_headers.get(header)
    if parsed is None:
        d = ast.literal_eval(header[10 if data[6] == 1 else 12 :].decode("latin1"))
        dtype = np.dtype(d["descr"])
        if dtype.hasobject:
            raise ValueError(".npy field holds Python objects; refusing to unpickle them")
        parsed = dtype, tuple(d["shape"]), bool(d["fortran_order"]), math.prod(d["shape"])
        if len(_npy_headers) < 256:
            _npy_headers[header] = parsed
    dtype, shape, fortran, count = parsed
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f".npy field holds {len(data) - start} bytes of data, its header says {shape} {dtype}")
    array = np.frombuffer(data, dtype, count, offset=start)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
