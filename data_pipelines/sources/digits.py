"""Binarized 8x8 digits, from the copy scikit-learn ships (1,797 images, no download).

Fixed split (permutation seed 0): 1,257 train / 180 validation / 360 test. Pixels are
0..16; a pixel is on when >= 8. Each sample is the picture twice, as an (8, 8) uint8 0/255
`.npy` (what the smoke models read: a header and 64 bytes, no image codec) and as a PNG (for
image tools and workloads that read images), its label and a JSON record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.shards import MANIFEST, samples_per_shard, write_shards

THRESHOLD = 8
SPLITS = {"train": 1257, "val": 180, "test": 360}
SHARDS = {"train": 8, "val": 2, "test": 2}


def binarized_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images >= THRESHOLD).astype(np.uint8), d.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
    perm = np.random.default_rng(0).permutation(sum(SPLITS.values()))
    out, start = {}, 0
    for name, n in SPLITS.items():
        out[name] = np.sort(perm[start : start + n])
        start += n
    return out


def build(out_dir: str | Path, *, min_shards: int = 0) -> dict[str, dict]:
    """Write train/val/test shard folders under `out_dir` (SHARDS of each, or at least
    `min_shards`); returns their manifests."""
    images, labels = binarized_digits()
    manifests = {}
    for split, idx in split_indices().items():
        per_shard = samples_per_shard(len(idx), SHARDS[split], min_shards)
        samples = (
            {
                "__key__": f"digit{i:04d}",
                "npy": images[i] * 255,
                "png": images[i] * 255,
                "cls": int(labels[i]),
                "json": {"index": int(i), "label": int(labels[i]), "threshold": THRESHOLD},
            }
            for i in idx
        )
        manifests[split] = write_shards(samples, Path(out_dir) / split, maxcount=per_shard)
    return manifests


def is_built(out_dir: str | Path) -> bool:
    return all((Path(out_dir) / split / MANIFEST).exists() for split in SPLITS)
