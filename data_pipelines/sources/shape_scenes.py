"""Detection scenes: 1 to 5 shapes (circle, square, triangle; the class) in random colours,
sizes and places on a light 64x64 background, none touching another, each with its box.
The default data of the DETR workload (no download).

Samples are a PNG and a JSON record: {"size": 64, "objects": [{"label": 0, "shape":
"circle", "color": "red", "box": [x0, y0, x1, y1]}, ...]}, boxes in pixel edges (a shape
covering pixel columns 3..12 has x0=3, x1=13). Seeded: the same on every machine.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.shards import MANIFEST, samples_per_shard, write_shards
from data_pipelines.sources.shapes import BACKGROUND, COLORS, SHAPES, paint

SIZE, MAX_OBJECTS, MIN_SIDE, MAX_SIDE = 64, 5, 10, 24
SPLITS = {"train": (10_000, 0), "val": (500, 1), "test": (1000, 2)}


def scene(rng: random.Random, size: int = SIZE, max_objects: int = MAX_OBJECTS) -> tuple[Image.Image, dict]:
    """One image and its record. Shapes that find no free place in 100 tries are left out,
    so the record always lists exactly what is drawn."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(img)
    objects: list[dict] = []
    for _ in range(rng.randint(1, max_objects)):
        for _ in range(100):
            side = rng.randint(MIN_SIDE, MAX_SIDE)
            x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
            box = [x0, y0, x0 + side, y0 + side]
            # a 1-pixel gap at least between boxes: every object is whole and separate
            if all(
                box[0] > b[2] or b[0] > box[2] or box[1] > b[3] or b[1] > box[3] for b in (o["box"] for o in objects)
            ):
                break
        else:
            continue
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        paint(pen, shape, [x0, y0, x0 + side - 1, y0 + side - 1], COLORS[color])
        objects.append({"label": SHAPES.index(shape), "shape": shape, "color": color, "box": box})
    return img, {"size": size, "objects": objects}


def build(out_dir: str | Path, *, counts: dict | None = None, min_shards: int = 0) -> dict:
    manifests = {}
    for split, (n, seed) in (counts or SPLITS).items():
        rng = random.Random(f"shape-scenes-{seed}")

        def samples(split=split, n=n, rng=rng):
            for i in range(n):
                img, record = scene(rng)
                yield {"__key__": f"{split}{i:06d}", "png": np.asarray(img), "json": record}

        manifests[split] = write_shards(samples(), Path(out_dir) / split, maxcount=samples_per_shard(n, 8, min_shards))
    return manifests


def is_built(out_dir: str | Path) -> bool:
    return all((Path(out_dir) / split / MANIFEST).exists() for split in SPLITS)
