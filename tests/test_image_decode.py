"""JPEGs decoded at a DCT scale (PIL's draft, or simplejpeg at the same scale) against a
full PIL decode: the same shape, crop and flip, pixels within the stated tolerance, the
same pixels every time; PNG and CMYK go to PIL; a corrupt JPEG names its sample."""

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from data_pipelines import image_transforms as it
from data_pipelines.decode import image_tensor
from data_pipelines.image_transforms import ImageTransforms, image_with_info
from data_pipelines.shards import write_shards
from data_pipelines.stream import DataError, iter_samples

# Distance from a full decode, 0-255 units, targets of 48 px and more (benchmarks/image_decode.py
# measures 512 px targets: mean <= 0.8, max 17). A DCT-scaled decode low-passes differently
# from Pillow's antialiased bicubic: equal on smooth regions, up to ~1/8 of a step at hard edges.
MEAN_ABS, MAX_ABS = 2.0, 32
RANDOM = ImageTransforms(crop="random", hflip=0.5)


@functools.cache
def photo(width, height, mode="RGB", fmt="JPEG", seed=0, **save):
    """Gradients, soft-edged shapes and noise: what DCT scaling sees in photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(x * 4 + c) * np.cos(y * 3 - c) for c in (0, 1, 2)], -1) * 100 + 128
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0, r = int(rng.integers(width)), int(rng.integers(height)), int(rng.integers(width // 10, width // 4))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1))
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 5, (height, width, 3)).astype(np.int16)
    img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    if mode == "RGBA":
        img.putalpha(Image.fromarray((x * 255).astype(np.uint8)))
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **save)
    return buf.getvalue()


def sample(data, field="jpg", t=RANDOM, bucket=None, key="k1"):
    s = {"__key__": key, field: data, "__transforms__": t, "__seed__": 3, "__epoch__": 1}
    if bucket is not None:
        s["__bucket__"] = bucket
    return s


def full_decode(s, size):
    """The path before DCT scaling: PIL decodes the whole image, then resize and crop."""
    target = tuple(s["__bucket__"]) if "__bucket__" in s else (size, size)
    t = s["__transforms__"]
    img, info = it.transform(it.load_image(s), target, t, it.sample_rng(s["__seed__"], s["__epoch__"], s["__key__"]))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1), info


CASES = [  # (width, height, mode, save options, size, bucket, DCT scale)
    (400, 300, "RGB", {}, 128, None, 2),
    (300, 400, "RGB", {}, 64, (96, 64), 2),
    (640, 480, "RGB", {"progressive": True}, 96, None, 4),
    (512, 384, "L", {}, 64, None, 4),
    (333, 257, "CMYK", {}, 64, None, 4),
    (1024, 768, "RGB", {}, 64, (64, 48), 8),
    (160, 120, "RGB", {}, 96, None, 1),
    (100, 80, "L", {}, 128, None, 1),  # smaller than its target: scaled up
]


@pytest.mark.parametrize("w, h, mode, save, size, bucket, scale", CASES)
@pytest.mark.parametrize("t", [ImageTransforms(), RANDOM, ImageTransforms(resize="stretch")])
def test_scaled_decode_is_within_tolerance_of_a_full_decode(w, h, mode, save, size, bucket, scale, t):
    s = sample(photo(w, h, mode, **save), t=t, bucket=bucket)
    target = bucket or (size, size)
    if t.resize == "cover":
        assert it.decode_rgb(s, target, t, "pil")[2] == scale  # the cases cover 1, 2, 4 and 8
    want, want_info = full_decode(s, size)
    got, info = image_with_info(s, size)
    assert got.shape == want.shape == (3, target[1], target[0]) and got.dtype == torch.float32
    assert info == want_info  # crop offsets and flip drawn as before
    diff = (got - want).abs() * 127.5
    assert diff.mean() <= MEAN_ABS and diff.max() <= MAX_ABS, (float(diff.mean()), float(diff.max()))
    if it.dct_scale(w, h, it.resized_size(w, h, target, t)) == 1:
        assert torch.equal(got, want), "no DCT scaling, yet other pixels"


@pytest.mark.skipif(it.simplejpeg is None, reason="simplejpeg is not installed")
@pytest.mark.parametrize("w, h, mode, save, size, bucket, scale", CASES)
def test_simplejpeg_gives_pils_pixels(w, h, mode, save, size, bucket, scale):
    """Same libjpeg-turbo, same DCT scale: an install without simplejpeg (or a JPEG that
    it refuses) trains on the same pixels."""
    s = sample(photo(w, h, mode, **save), bucket=bucket)
    fast, info = image_with_info(s, size)
    pil, pil_info = image_with_info(s, size, decoder="pil")
    assert torch.equal(fast, pil) and info == pil_info


def test_the_same_bytes_give_the_same_pixels():
    s = sample(photo(640, 480, seed=5), bucket=(96, 64))
    runs = [image_with_info(dict(s), 64) for _ in range(3)]
    assert all(torch.equal(runs[0][0], p) and runs[0][1] == i for p, i in runs[1:])
    other_epoch = image_with_info({**s, "__epoch__": 2}, 64)
    assert other_epoch[1] != runs[0][1] or not torch.equal(other_epoch[0], runs[0][0])


class Spy:
    """simplejpeg, counting the images it decodes."""

    def __init__(self, real):
        self.real, self.decoded = real, 0
        self.decode_jpeg_header = real.decode_jpeg_header

    def decode_jpeg(self, *args, **kwargs):
        self.decoded += 1
        return self.real.decode_jpeg(*args, **kwargs)


@pytest.mark.skipif(it.simplejpeg is None, reason="simplejpeg is not installed")
def test_png_cmyk_and_misnamed_bytes_go_to_pil(monkeypatch):
    spy = Spy(it.simplejpeg)
    monkeypatch.setattr(it, "simplejpeg", spy)
    for s in (
        sample(photo(200, 150, "RGBA", fmt="PNG"), field="png"),  # alpha dropped, as convert("RGB") does
        sample(photo(200, 150, "RGB", fmt="PNG"), field="jpg"),  # PNG bytes under a JPEG name
        sample(photo(200, 150, "CMYK")),
    ):
        got, info = image_with_info(s, 64)
        want, want_info = full_decode(s, 64)
        assert info == want_info and got.shape == want.shape
        if "png" in s or s["jpg"][:2] != b"\xff\xd8":
            assert torch.equal(got, want)
    assert spy.decoded == 0
    image_with_info(sample(photo(200, 150)), 64)
    assert spy.decoded == 1


def test_without_simplejpeg_pil_decodes_the_same(monkeypatch):
    s = sample(photo(512, 384), bucket=(96, 64))
    with_it = image_with_info(s, 64)
    monkeypatch.setattr(it, "simplejpeg", None)
    assert torch.equal(image_with_info(s, 64)[0], with_it[0])


@pytest.mark.parametrize("cut", ["truncated", "garbage"])
def test_a_corrupt_jpeg_names_its_sample(tmp_path, cut):
    good = photo(200, 150)
    bad = good[: len(good) // 2] if cut == "truncated" else good[:2] + b"not a jpeg at all" * 8
    samples = [{"__key__": f"s{i:04d}", "jpg": bad if i == 2 else good} for i in range(4)]
    write_shards(samples, tmp_path, maxcount=10)
    urls = [str(tmp_path / "shard-000000.tar")]

    def decode(s):
        return image_tensor(s, 32)

    with pytest.raises(DataError, match=r"sample 's0002' in shard '.*shard-000000\.tar': cannot decode"):
        list(iter_samples(urls, "fail", decode))
    assert len(list(iter_samples(urls, "skip", decode))) == 3
