import copy
import hashlib
import io
import itertools

import numpy as np
import pytest
import torch
from conftest import collate_list
from PIL import Image

from data_pipelines.buckets import Buckets
from data_pipelines.image_transforms import ImageTransforms, image_with_info
from data_pipelines.shards import write_shards
from data_pipelines.stream import ShardList, ShardStream, StreamLoader

RANDOM = ImageTransforms(crop="random", hflip=0.5)


def noise_png(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def annotated(key="k1", epoch=0, seed=0, t=RANDOM, size=(40, 24), bucket=(16, 16)):
    sample = {"__key__": key, "png": noise_png(*size, 1), "__transforms__": t, "__seed__": seed, "__epoch__": epoch}
    if bucket is not None:
        sample["__bucket__"] = bucket
    return sample


def test_same_seed_epoch_and_key_give_the_same_pixels():
    a, info_a = image_with_info(annotated(), 16)
    b, info_b = image_with_info(annotated(), 16)
    assert torch.equal(a, b) and info_a == info_b
    assert a.shape == (3, 16, 16) and info_a.original_size == (24, 40)


def test_random_choices_change_with_epoch_seed_and_key():
    base = [image_with_info(annotated(key=f"k{i}"), 16)[1] for i in range(20)]
    for change in ({"epoch": 1}, {"seed": 7}):
        other = [image_with_info(annotated(key=f"k{i}", **change), 16)[1] for i in range(20)]
        assert sum(a != b for a, b in zip(base, other)) >= 10, change
    assert len({(i.crop_top_left, i.flipped) for i in base}) > 5, "keys do not vary the crop"
    assert {i.flipped for i in base} == {True, False}


def test_flip_and_crop_are_what_info_says():
    plain, _ = image_with_info(annotated(t=ImageTransforms(crop="random")), 16)
    flipped, info = image_with_info(annotated(t=ImageTransforms(crop="random", hflip=1.0)), 16)
    assert info.flipped and torch.equal(flipped, plain.flip(-1))
    # a 40x24 image covers a 16x16 bucket at 27x16 (scale 2/3): the crop's left is in 0..11
    top, left = info.crop_top_left
    resized = Image.open(io.BytesIO(annotated()["png"])).convert("RGB").resize((27, 16), Image.BICUBIC)
    want = np.asarray(resized, dtype=np.float32)[top : top + 16, left : left + 16] / 127.5 - 1.0
    assert top == 0 and 0 <= left <= 11
    assert torch.allclose(plain, torch.from_numpy(want).permute(2, 0, 1))


def test_stretch_and_default_center_crop():
    stretched, info = image_with_info(annotated(t=ImageTransforms(resize="stretch"), bucket=(24, 12)), 16)
    assert stretched.shape == (3, 12, 24) and info.crop_top_left == (0, 0) and not info.flipped
    plain = {"__key__": "k", "png": noise_png(40, 24, 1)}  # no stream annotations: eval, tools
    center, info = image_with_info(plain, 16)
    assert center.shape == (3, 16, 16) and info.crop_top_left == (0, 5) and not info.flipped


def test_bad_transform_names_the_setting():
    with pytest.raises(ValueError, match="crop 'left'"):
        ImageTransforms(crop="left")
    with pytest.raises(ValueError, match="hflip 1.5"):
        ImageTransforms(hflip=1.5)


# ------------------------------------------------------------------ through the stream
SIZES = [(40, 24), (24, 40), (30, 30)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transform_shards")
    urls = []
    for i in range(4):
        samples = ({"__key__": f"s{j:04d}", "png": noise_png(*SIZES[j % 3], j)} for j in range(i * 12, (i + 1) * 12))
        write_shards(samples, folder / f"part{i}", prefix=f"p{i}", maxcount=12)
        urls.append(str(folder / f"part{i}" / f"p{i}-000000.tar"))
    return ShardList(urls, [12] * 4)


def decode_digest(sample):
    pixels, info = image_with_info(sample, 16)
    return sample["__key__"], sample["__epoch__"], hashlib.sha1(pixels.numpy().tobytes()).hexdigest(), info


def stream(shards, rank=0, world=1, workers=0, buckets=True):
    return ShardStream(
        shards,
        decode=decode_digest,
        collate=collate_list,
        batch_size=3,
        seed=11,
        shuffle_buffer=4,
        rank=rank,
        world_size=world,
        num_workers=max(1, workers),
        buckets=Buckets(((16, 16), (24, 12), (12, 24))) if buckets else None,
        transforms=RANDOM,
    )


def test_pixels_do_not_depend_on_the_world_size(shards):
    def pixels(world):
        out = {}
        for rank in range(world):
            for b in itertools.islice(iter(stream(shards, rank, world)), 48 // (3 * world) * 2):
                out.update({(key, epoch): digest for key, epoch, digest, _ in b.data})
        return out

    one, two = pixels(1), pixels(2)
    common = one.keys() & two.keys()
    assert len(common) > 20
    assert all(one[k] == two[k] for k in common)
    both = [k for k, e in one if e == 0 and (k, 1) in one]
    assert sum(one[(k, 0)] != one[(k, 1)] for k in both) > len(both) // 3, "epochs repeat the same crops"


@pytest.mark.parametrize("buckets", [True, False])
def test_resume_mid_epoch_reproduces_the_pixels(shards, buckets):
    ref = StreamLoader(stream(shards, workers=2, buckets=buckets), num_workers=2)
    for _ in range(5):
        next(ref)
    state = copy.deepcopy(ref.state_dict())
    rest = [next(ref) for _ in range(20)]
    resumed = StreamLoader(stream(shards, workers=2, buckets=buckets), num_workers=2)
    assert resumed.load_state_dict([state]) == "exact"
    assert [next(resumed) for _ in range(20)] == rest
    assert len({b[0][1] for b in rest}) == 2, "the resumed stretch should cross an epoch"


def test_sd_decode_crops_to_the_bucket_and_passes_size_and_crop_on():
    from types import SimpleNamespace

    from torch.utils.data import default_collate

    from models.sd.workload import SDConfig, SDWorkload

    host = SimpleNamespace(cfg=SDConfig(image_size=16), tokenize=lambda texts: torch.zeros(1, 4, dtype=torch.long))
    items = [SDWorkload.decode(host, {**annotated(key=f"k{i}", bucket=(24, 12)), "txt": b"a cat"}) for i in range(4)]
    batch = default_collate(items)
    assert batch["images"].shape == (4, 3, 12, 24)
    assert batch["original_size"].tolist() == [[24, 40]] * 4
    for i, item in enumerate(items):  # 40x24 covers 24x12 at 24x14 (scale 0.6): top in 0..2, left 0
        pixels, info = image_with_info(annotated(key=f"k{i}", bucket=(24, 12)), 16)
        assert torch.equal(item["images"], pixels) and item["crop_top_left"].tolist() == list(info.crop_top_left)
        top, left = info.crop_top_left
        assert 0 <= top <= 2 and left == 0
    plain = SDWorkload.decode(host, {"__key__": "k", "png": noise_png(40, 24, 1), "txt": b"a cat"})
    assert plain["images"].shape == (3, 16, 16) and plain["crop_top_left"].tolist() == [0, 5]
