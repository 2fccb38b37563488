"""The 2-D Gaussian mixture of the score-based recipes as shards (fixed seeds: the same
points on every machine): 20,000 train, 2,000 val, 2,000 test; one JSON per point."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from data_pipelines.shards import MANIFEST, samples_per_shard, write_shards

SPLITS = {"train": (20_000, 0), "val": (2_000, 1), "test": (2_000, 2)}
MIXTURE_COMPONENTS, MIXTURE_RADIUS, MIXTURE_STD = 8, 2.0, 0.15


def mixture2d(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points of 8 Gaussians (std 0.15) evenly spaced on a circle of radius 2."""
    k = torch.randint(MIXTURE_COMPONENTS, (n,), generator=generator)
    angle = 2 * math.pi * k.double() / MIXTURE_COMPONENTS
    centers = MIXTURE_RADIUS * torch.stack([angle.cos(), angle.sin()], 1)
    return (centers + MIXTURE_STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


def build(out_dir: str | Path, *, counts: dict | None = None, min_shards: int = 0) -> dict[str, dict]:
    """Write train/val/test shard folders under `out_dir`; returns their manifests.
    `counts` replaces SPLITS (split: (points, seed)), e.g. for tests."""
    manifests = {}
    for split, (n, seed) in (counts or SPLITS).items():
        points = mixture2d(n, torch.Generator().manual_seed(seed)).tolist()
        samples = ({"__key__": f"{split}{i:06d}", "json": {"x": p}} for i, p in enumerate(points))
        manifests[split] = write_shards(samples, Path(out_dir) / split, maxcount=samples_per_shard(n, 8, min_shards))
    return manifests


def is_built(out_dir: str | Path) -> bool:
    return all((Path(out_dir) / split / MANIFEST).exists() for split in SPLITS)
