"""The 2-D Gaussian mixture of the score-based workload as shards (fixed seeds: the same
points on every machine): 20,000 train, 2,000 val, 2,000 test; one JSON per point."""

from __future__ import annotations

from pathlib import Path

import torch

from data_pipelines.shards import MANIFEST, write_shards

SPLITS = {"train": (20_000, 0), "val": (2_000, 1), "test": (2_000, 2)}


def build(out_dir: str | Path) -> dict[str, dict]:
    from models.score.workload import mixture2d

    manifests = {}
    for split, (n, seed) in SPLITS.items():
        points = mixture2d(n, torch.Generator().manual_seed(seed)).tolist()
        samples = ({"__key__": f"{split}{i:06d}", "json": {"x": p}} for i, p in enumerate(points))
        manifests[split] = write_shards(samples, Path(out_dir) / split, maxcount=-(-n // 8))
    return manifests


def is_built(out_dir: str | Path) -> bool:
    return all((Path(out_dir) / split / MANIFEST).exists() for split in SPLITS)
