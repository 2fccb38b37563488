"""Captioned shapes: captions, boxes and pixels agree; builds are reproducible; the shards
are in img2dataset's layout and read back through our stream."""

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.sources import shapes
from models.sd.color_match import Palette

PALETTE = Palette(shapes.COLORS, shapes.BACKGROUND)

ROOT = Path(__file__).resolve().parents[1]


def test_caption_colour_and_box_match_the_pixels():
    rng = random.Random(0)
    for _ in range(300):
        img, caption, record = shapes.draw(rng, 32)
        (obj,) = record["objects"]
        px = np.asarray(img)
        assert PALETTE.dominant(px) == obj["color"]
        assert caption.startswith(f"a {obj['color']} {obj['shape']}")
        ys, xs = np.nonzero(np.abs(px.astype(int) - shapes.BACKGROUND).sum(-1) > 60)
        x0, y0, x1, y1 = obj["box"]
        assert x0 - 1 <= xs.min() and xs.max() <= x1 + 1 and y0 - 1 <= ys.min() and ys.max() <= y1 + 1
    blank = np.full((32, 32, 3), shapes.BACKGROUND, np.uint8)
    assert PALETTE.dominant(blank) is None


def test_several_shapes_each_in_its_own_cell():
    rng = random.Random(1)
    for _ in range(50):
        _, caption, record = shapes.draw(rng, 48, max_shapes=4)
        positions = [o["position"] for o in record["objects"]]
        assert len(set(positions)) == len(positions) and 1 <= len(positions) <= 4
        assert caption.count(" and ") == len(positions) - 1


def test_build_is_reproducible_and_reads_back(tmp_path):
    counts = {"train": (64, 0), "val": (16, 1)}
    a = shapes.build(tmp_path / "a", counts=counts)
    assert Palette.load(tmp_path / "a" / "palette.json") == PALETTE
    prompts = (tmp_path / "a" / "prompts.txt").read_text().splitlines()
    assert len(set(prompts)) == 5 * 3 * 9 and all(PALETTE.named(p) == p.split()[1] for p in prompts)
    b = shapes.build(tmp_path / "b", counts=counts)
    assert [s["sha256"] for s in a["train"]["shards"]] == [s["sha256"] for s in b["train"]["shards"]]
    from data_pipelines.stream import eval_batches, resolve_shards

    seen = []
    for batch in eval_batches(
        resolve_shards(str(tmp_path / "a/val")), decode=lambda s: s, collate=list, batch_size=8, rank=0, world_size=1
    ):
        seen += batch
    assert len(seen) == 16
    for sample in seen:
        record = json.loads(sample["json"])
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        assert image.shape == (32, 32, 3)
        assert PALETTE.dominant(image) == record["objects"][0]["color"]
        assert sample["txt"].decode().startswith("a " + record["objects"][0]["color"])


def test_cli_refuses_a_bad_shape_count(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "launch.make_shards", "shapes", "--out", str(tmp_path), "--max-shapes", "12"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "--max-shapes must be 1..9" in out.stderr
