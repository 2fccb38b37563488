"""Captioned shapes: coloured circles, squares and triangles at named positions on a light
background, with captions such as "a red circle at the top left" and their boxes. The
default data of the text-to-image workload (no download), in img2dataset's layout (png +
txt + json per key); the boxes serve detection models too.

Everything is drawn from a seeded generator, so a build is the same on every machine.
Beside the splits: `palette.json` (the caption colours, for a colour check of samples) and
`prompts.txt` (every colour, shape and place once, for sample grids).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.shards import MANIFEST, samples_per_shard, write_shards

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
BACKGROUND = (240, 240, 240)
SPLITS = {"train": (5000, 0), "val": (500, 1), "test": (500, 2)}


def paint(pen: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    """One filled shape inside box (x0, y0, x1, y1; PIL fills x1 and y1 too)."""
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)


def draw(rng: random.Random, size: int, max_shapes: int = 1) -> tuple[Image.Image, str, dict]:
    """One image, its caption and a record of its objects (boxes in pixels, x0 y0 x1 y1)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(img)
    cell = size / 3
    objects, phrases = [], []
    cells = rng.sample(list(POSITIONS), rng.randint(1, max_shapes))
    for where in cells:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        cx, cy = POSITIONS[where]
        half = cell * rng.uniform(0.3, 0.45)
        x = (cx + 0.5) * cell + rng.uniform(-0.05, 0.05) * cell
        y = (cy + 0.5) * cell + rng.uniform(-0.05, 0.05) * cell
        box = [round(x - half), round(y - half), round(x + half), round(y + half)]
        paint(pen, shape, box, COLORS[color])
        objects.append({"shape": shape, "color": color, "position": where, "box": box})
        phrases.append(f"a {color} {shape} at the {where}" if where != "center" else f"a {color} {shape} in the center")
    return img, " and ".join(phrases), {"objects": objects, "size": size}


def prompts(n: int) -> list[str]:
    """n captions in the dataset's words, cycling colour, then shape, then position."""
    colors, positions = list(COLORS), list(POSITIONS)
    out = []
    for i in range(n):
        c, s = colors[i % len(colors)], SHAPES[(i // len(colors)) % len(SHAPES)]
        p = positions[(i // (len(colors) * len(SHAPES))) % len(positions)]
        out.append(f"a {c} {s} in the center" if p == "center" else f"a {c} {s} at the {p}")
    return out


def write_palette(path: str | Path) -> Path:
    """The colours the captions name, as RGB, and the background: what a colour check of
    generated images needs to know of this dataset (`model.color_palette` of configs/sd/)."""
    Path(path).write_text(json.dumps({"colors": COLORS, "background": BACKGROUND}, indent=1))
    return Path(path)


def build(
    out_dir: str | Path, *, size: int = 32, max_shapes: int = 1, counts: dict | None = None, min_shards: int = 0
) -> dict:
    """Write the splits, `palette.json`, `prompts.txt`, then a CLIP BPE tokenizer trained on the train captions
    into `out_dir/tokenizer` (trained once here and shipped with the shards: docs/platform-notes.md)."""
    from data_pipelines.tokenizer import train_clip_bpe

    manifests, captions = {}, []
    for split, (n, seed) in (counts or SPLITS).items():
        rng = random.Random(f"shapes-{seed}-{size}-{max_shapes}")

        def samples(split=split, n=n, rng=rng):
            for i in range(n):
                img, caption, record = draw(rng, size, max_shapes)
                if split == "train":
                    captions.append(caption)
                yield {"__key__": f"{split}{i:06d}", "png": np.asarray(img), "txt": caption, "json": record}

        manifests[split] = write_shards(samples(), Path(out_dir) / split, maxcount=samples_per_shard(n, 8, min_shards))
    write_palette(Path(out_dir) / "palette.json")
    (Path(out_dir) / "prompts.txt").write_text("\n".join(prompts(len(COLORS) * len(SHAPES) * len(POSITIONS))) + "\n")
    train_clip_bpe(captions, Path(out_dir) / "tokenizer", vocab_size=256)
    return manifests


def is_built(out_dir: str | Path) -> bool:
    return (
        all((Path(out_dir) / split / MANIFEST).exists() for split in SPLITS)
        and (Path(out_dir) / "palette.json").exists()
        and (Path(out_dir) / "prompts.txt").exists()
        and (Path(out_dir) / "tokenizer" / "merges.txt").exists()
    )
