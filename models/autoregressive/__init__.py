"""Autoregressive density models on binarized images: the smoke-test family.

Reports exact test NLL in nats per image and bits per dimension.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from data_pipelines.decode import npy_array
from models.autoregressive.nets import FVSBN, MADE, NADE, ARNet, Factorized, bernoulli_nll
from models.base import Workload
from models.registry import register

IMAGE_FIELDS = ("npy", "png", "jpg", "jpeg", "webp")  # the first a sample has is read


class BinaryImageDensity(Workload):
    """Shared workload for every net here: a grayscale image per sample, `model.image_size`
    square: an (H, W) uint8 `.npy` (launch.make_shards digits writes one), else a png, jpg or
    webp (older digit shards have only the png); a pixel is on above 127."""

    best_metric = "nll"

    @property
    def dims(self) -> int:
        return self.cfg.image_size**2

    def build_net(self) -> ARNet:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        return self.build_net()

    def decode(self, sample: dict) -> torch.Tensor:
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        if field is None:
            raise KeyError(
                f"no image field ({'/'.join(IMAGE_FIELDS)}); the sample has "
                f"{sorted(k for k in sample if not k.startswith('__'))}"
            )
        if field == "npy":
            img = npy_array(sample[field])
            if img.dtype != np.uint8:
                raise ValueError(f".npy image is {img.dtype}, not uint8")
        else:
            img = np.asarray(Image.open(io.BytesIO(sample[field])).convert("L"))
        size = self.cfg.image_size
        if img.shape != (size, size):
            raise ValueError(f"image is {img.shape}, model.image_size is {size}")
        return torch.from_numpy((img > 127).astype(np.float32).reshape(-1))

    def decode_batch(self, samples: list[dict]) -> torch.Tensor:
        """All-`.npy` batches as one array (a few us a sample, not tens); others as decode does."""
        if not all("npy" in s for s in samples):
            return super().decode_batch(samples)
        fields = [s["npy"] for s in samples]
        first, size = npy_array(fields[0]), self.cfg.image_size
        if first.dtype != np.uint8 or first.shape != (size, size):
            raise ValueError(f".npy image is {first.shape} {first.dtype}, model.image_size is {size}")
        header = len(fields[0]) - first.nbytes
        rows = np.frombuffer(b"".join(fields), np.uint8)
        if rows.size == len(fields[0]) * len(fields) and first.flags.c_contiguous:
            rows = rows.reshape(len(fields), -1)
            if (rows[:, :header] == rows[0, :header]).all():  # one header: these dtype and shape
                return torch.from_numpy((rows[:, header:] > 127).astype(np.float32))
        return self.collate([self.decode(s) for s in samples])

    def training_loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return bernoulli_nll(model(x), x).mean()

    def eval_sums(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        nll = bernoulli_nll(model(x), x)
        return {"nll_sum": nll.sum(), "count": torch.tensor(float(x.shape[0]), device=x.device)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        nll = sums["nll_sum"] / sums["count"]
        return {"nll": nll, "bits_per_dim": nll / (self.dims * math.log(2)), "count": sums["count"]}

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
        s = self.cfg.image_size
        return model.sample(n, generator).view(n, 1, s, s)


@dataclass(kw_only=True)
class FactorizedConfig:
    name: str = "factorized"
    image_size: int = 8


@register("factorized")
class FactorizedWorkload(BinaryImageDensity):
    Config = FactorizedConfig

    def build_net(self) -> ARNet:
        return Factorized(self.dims)


@dataclass(kw_only=True)
class FVSBNConfig:
    name: str = "fvsbn"
    image_size: int = 8


@register("fvsbn")
class FVSBNWorkload(BinaryImageDensity):
    Config = FVSBNConfig

    def build_net(self) -> ARNet:
        return FVSBN(self.dims)


@dataclass(kw_only=True)
class NADEConfig:
    name: str = "nade"
    image_size: int = 8
    hidden: int = 256


@register("nade")
class NADEWorkload(BinaryImageDensity):
    Config = NADEConfig

    def build_net(self) -> ARNet:
        return NADE(self.dims, self.cfg.hidden)

    def flops_per_sample(self, batch, batch_size: int) -> float:
        # elementwise, so no matmul for the counter to see: the forward's 2 D H
        # multiply-adds (W[:, j] x_j with its running sum, then V_i . h_i), x3 with backward
        return 3 * 2 * 2 * self.dims * self.cfg.hidden


@dataclass(kw_only=True)
class MADEConfig:
    name: str = "made"
    image_size: int = 8
    hidden: list[int] = field(default_factory=lambda: [512])
    mask_seed: int = 0
    direct: bool = False


@register("made")
class MADEWorkload(BinaryImageDensity):
    Config = MADEConfig

    def build_net(self) -> ARNet:
        return MADE(self.dims, list(self.cfg.hidden), self.cfg.mask_seed, self.cfg.direct)
