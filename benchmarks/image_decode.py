"""JPEG decode to a training size, per DataLoader worker (one thread): PIL full decode,
PIL with draft (DCT scaling), simplejpeg at the same scale (the image path's choice),
simplejpeg at its own downscale (any m/8 factor >= the cover size) and simplejpeg with
fastdct + fastupsample; every image through every path in turn, round by round.

Prints JSON: images/s per path and source size (median round), the median of the rounds'
speed ratios vs PIL plain, and each path's pixel distance from PIL plain after the same
resize + center crop (0-255 units), and whether it gives PIL+draft's pixels exactly.

    .venv/bin/python benchmarks/image_decode.py [--target 512] [--sources 512,1024,1536,2048] [--rounds 9]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines import image_transforms as it  # noqa: E402

torch.set_num_threads(1)


def photo_like(width: int, height: int, seed: int) -> bytes:
    """Smooth gradients, shapes with soft edges and sensor-like noise, JPEG quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(x * rng.uniform(2, 6) + c) * np.cos(y * rng.uniform(2, 6) - c) for c in (0, 1, 2)], -1)
    img = Image.fromarray(((base * 0.5 + 0.5) * 200 + 20).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(width // 20, width // 4))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0 - r, y0 - r, x0 + r, y0 + r // 2), fill=color)
    img = img.filter(ImageFilter.GaussianBlur(max(1, width // 512)))
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def pil_plain(sample, target, t):
    return it.transform(it.load_image(sample), target, t, None)[0]


def pil_draft(sample, target, t):
    return it.transform(*_with(it.decode_rgb(sample, target, t, decoder="pil"), target, t))[0]


def simplejpeg_draft_scale(sample, target, t):
    return it.transform(*_with(it.decode_rgb(sample, target, t, decoder="auto"), target, t))[0]


def simplejpeg_own_scale(sample, target, t, **fast):
    import simplejpeg

    data = sample["jpg"]
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    rw, rh = it.resized_size(w, h, target, t)
    fit = (rh, rw)
    if fast:  # at the draft scale, with libjpeg-turbo's faster, less exact IDCT and upsampling
        fit = tuple(-(-n // it.dct_scale(w, h, (rw, rh))) for n in (h, w))
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=fit[0], min_width=fit[1], **fast)
    # libjpeg-turbo scales by m/8 (m = 1..16), rounding the size up: the full image spans w*m/8
    m = next(m for m in range(1, 17) if -(-w * m // 8) == pixels.shape[1])
    img = Image.fromarray(pixels).resize((rw, rh), Image.BICUBIC, box=(0, 0, w * m / 8, h * m / 8))
    top, left = (rh - target[1]) // 2, (rw - target[0]) // 2
    return img.crop((left, top, left + target[0], top + target[1]))


def simplejpeg_fast(sample, target, t):
    return simplejpeg_own_scale(sample, target, t, fastdct=True, fastupsample=True)


def _with(decoded, target, t):
    img, stored, dct = decoded
    return img, target, t, None, stored, dct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=int, default=512)
    ap.add_argument("--sources", default="512,1024,1536,2048")
    ap.add_argument("--images", type=int, default=6, help="distinct images per source size")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    paths = {"pil_plain": pil_plain, "pil_draft": pil_draft}
    if it.simplejpeg is not None:
        paths |= {
            "simplejpeg_draft_scale": simplejpeg_draft_scale,
            "simplejpeg_own_scale": simplejpeg_own_scale,
            "simplejpeg_fast": simplejpeg_fast,
        }
    target, t = (args.target, args.target), it.ImageTransforms()
    out = {"target": args.target, "threads": 1, "rounds": args.rounds, "cpus": os.cpu_count(), "sources": {}}
    for src in (int(s) for s in args.sources.split(",")):
        # 4:3 photos: the short side is the source size
        samples = [{"__key__": f"{src}-{i}", "jpg": photo_like(src * 4 // 3, src, i)} for i in range(args.images)]
        ref = [np.asarray(pil_plain(s, target, t), dtype=np.int16) for s in samples]
        drafted = [np.asarray(pil_draft(s, target, t), dtype=np.int16) for s in samples]
        row = {"jpeg_kb": round(sum(len(s["jpg"]) for s in samples) / len(samples) / 1024, 1)}
        for name, fn in paths.items():
            diff = np.concatenate(
                [np.abs(np.asarray(fn(s, target, t), dtype=np.int16) - r).ravel() for s, r in zip(samples, ref)]
            )
            same = all(
                np.array_equal(np.asarray(fn(s, target, t), dtype=np.int16), d) for s, d in zip(samples, drafted)
            )
            row[name] = {
                "max_abs": int(diff.max()),
                "mean_abs": round(float(diff.mean()), 3),
                "same_pixels_as_pil_draft": same,
                "seconds": [],
            }
        # each image through every path in turn, the order rotating: a busy neighbour slows all alike
        names = list(paths)
        for r in range(args.rounds):
            spent = dict.fromkeys(names, 0.0)
            for i, s in enumerate(samples):
                for name in names[(r + i) % len(names) :] + names[: (r + i) % len(names)]:
                    start = time.perf_counter()
                    paths[name](s, target, t)
                    spent[name] += time.perf_counter() - start
            for name in names:
                row[name]["seconds"].append(spent[name])
        plain, draft = row["pil_plain"]["seconds"], row["pil_draft"]["seconds"]
        for name in names:
            seconds = row[name]["seconds"]
            row[name]["images_per_s"] = round(len(samples) / float(np.median(seconds)), 1)
            # the median of the rounds' own ratios: robust to a round that a neighbour slowed
            row[name]["vs_pil_plain"] = round(float(np.median([p / x for p, x in zip(plain, seconds)])), 2)
            row[name]["vs_pil_draft"] = round(float(np.median([d / x for d, x in zip(draft, seconds)])), 2)
        for name in names:
            del row[name]["seconds"]
        out["sources"][f"{src * 4 // 3}x{src}"] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
