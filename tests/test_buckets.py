import copy
import io
import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
from conftest import collate_list
from PIL import Image

from data_pipelines.buckets import Buckets, generate_buckets, image_size
from data_pipelines.shards import write_shards
from data_pipelines.stream import DataError, ShardList, ShardStream, StreamLoader, iter_raw_samples

BUCKETS = Buckets(((16, 16), (24, 12), (12, 24)))
SIZES = {"sq": (20, 20), "wide": (40, 18), "tall": (14, 30)}  # -> 16x16, 24x12, 12x24
GROUP = {"sq": "16x16", "wide": "24x12", "tall": "12x24"}
KINDS = ["sq"] * 3 + ["wide"] * 2 + ["tall"]  # 60 / 40 / 20 of 120
N_SHARDS, PER_SHARD = 8, 15


def png(width, height, value=0):
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (value, 2 * value % 256, 3 * value % 256)).save(buf, "PNG")
    return buf.getvalue()


def kind_of(j: int) -> str:
    return KINDS[j % len(KINDS)]


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bucket_shards")
    urls = []
    for i in range(N_SHARDS):
        samples = (
            {"__key__": f"s{j:06d}", "png": png(*SIZES[kind_of(j)], j % 256)}
            for j in range(i * PER_SHARD, (i + 1) * PER_SHARD)
        )
        write_shards(samples, folder / f"part{i}", prefix=f"p{i}", maxcount=PER_SHARD)
        urls.append(str(folder / f"part{i}" / f"p{i}-000000.tar"))
    return ShardList(urls, [PER_SHARD] * N_SHARDS)


def decode_key_bucket(sample):
    return sample["__key__"], tuple(sample["__bucket__"])


def make_stream(shards, rank, world, workers, batch=4, with_keys=False, seed=5):
    return ShardStream(
        shards,
        decode=decode_key_bucket,
        collate=collate_list,
        batch_size=batch,
        seed=seed,
        shuffle_buffer=8,
        rank=rank,
        world_size=world,
        num_workers=workers,
        with_keys=with_keys,
        buckets=BUCKETS,
    )


def test_generated_buckets_fit_the_area_and_ratio():
    sizes = generate_buckets(area=512 * 512, step=64, max_ratio=2.0)
    assert (512, 512) in sizes and (640, 384) in sizes and (384, 640) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2.0
        assert w * (h + 64) > 512 * 512, f"{w}x{h} is not the largest height that fits"
    assert [w / h for w, h in sizes] == sorted(w / h for w, h in sizes)
    with pytest.raises(ValueError, match="no bucket fits"):
        generate_buckets(area=64, step=64)


def test_nearest_bucket_is_by_log_ratio_then_area():
    b = Buckets(((512, 512), (1024, 1024), (768, 384)))
    assert b.nearest(1000, 1000) == (1024, 1024)
    assert b.nearest(300, 300) == (512, 512)
    assert b.nearest(900, 500) == (768, 384)  # log(1.8) is nearer log(2) than log(1)
    assert b.nearest(700, 500) == (512, 512)  # log(1.4) is nearer log(1)


def test_histogram_of_a_mixed_ratio_image_folder(tmp_path):
    from data_pipelines.sources.folder import folder_to_shards

    src = tmp_path / "images"
    src.mkdir()
    counts = {"sq": 7, "wide": 5, "tall": 3}
    for kind, n in counts.items():
        for j in range(n):
            (src / f"{kind}{j}.png").write_bytes(png(*SIZES[kind], j))
            (src / f"{kind}{j}.txt").write_text(f"a {kind} picture")
    folder_to_shards(src, tmp_path / "shards")
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    assert BUCKETS.histogram(iter_raw_samples(urls)) == {GROUP[k]: n for k, n in counts.items()}


def test_size_comes_from_the_header_or_the_json_and_latents_by_shape():
    assert image_size({"png": png(40, 18)}) == (40, 18)
    assert image_size({"json": json.dumps({"width": 30, "height": 14}).encode()}) == (30, 14)
    with pytest.raises(KeyError, match="no image field.*'txt'"):
        image_size({"txt": b"a caption", "__key__": "k"})
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 3, 6), np.float32))
    assert BUCKETS.group_of({"latent.npy": buf.getvalue()}) == ("latent:4x3x6", None)
    assert BUCKETS.group_of({"png": png(14, 30)}) == ("12x24", (12, 24))


def test_every_batch_is_one_bucket_and_ranks_keep_equal_counts(image_shards):
    per_rank = []
    for rank in range(2):
        batches = list(itertools.islice(iter(make_stream(image_shards, rank, 2, 1)), 45))
        per_rank.append(len(batches))
        for b in batches:
            assert len(b.data) == 4
            kinds = {GROUP[kind_of(int(key[1:]))] for key, _ in b.data}
            assert len({bucket for _, bucket in b.data}) == 1 and len(kinds) == 1, b.data
            assert kinds == {"{}x{}".format(*b.data[0][1])}, "a sample went to the wrong bucket"
    assert per_rank == [45, 45]


def test_every_sample_comes_once_per_epoch_and_leftovers_carry(image_shards):
    """One rank for 3 epochs and then some: epochs 0..2 each deliver all 120 samples once;
    a partial bucket at an epoch's end is completed with the next epoch's samples."""
    s = make_stream(image_shards, 0, 1, 1, batch=7, with_keys=True)  # 7 divides no bucket's count
    seen: dict[int, Counter] = {}
    mixed_epochs = 0
    for b in itertools.islice(iter(s), 4 * 120 // 7):
        epochs = {name[1] for name in b.keys}
        mixed_epochs += len(epochs) > 1
        for name in b.keys:
            seen.setdefault(name[1], Counter())[name[4]] += 1
    assert mixed_epochs > 0, "no bucket was carried over an epoch's end"
    for epoch in range(3):
        assert max(seen[epoch].values()) == 1, f"epoch {epoch}: a sample came twice"
        assert len(seen[epoch]) == 120, f"epoch {epoch}: {120 - len(seen[epoch])} sample(s) missing"


def _run_to(loaders, k):
    for ld in loaders:
        while ld.batches < k:
            next(ld)
    return [copy.deepcopy(ld.state_dict()) for ld in loaders]


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_mid_epoch_with_buckets(image_shards, workers):
    ref = [StreamLoader(make_stream(image_shards, r, 2, workers), num_workers=workers) for r in range(2)]
    states = {k: _run_to(ref, k) for k in (3, 11)}
    assert any(st["readers"]["0"]["pending"] for st in states[3]), "nothing held in buckets at the cut"
    full = StreamLoader(make_stream(image_shards, 1, 2, workers), num_workers=workers)
    reference = [next(full) for _ in range(40)]
    for k, rank_states in states.items():
        resumed = StreamLoader(make_stream(image_shards, 1, 2, workers), num_workers=workers)
        assert resumed.load_state_dict(rank_states) == "exact"
        assert [next(resumed) for _ in range(40 - k)] == reference[k:]


def test_other_buckets_resume_elastically(image_shards):
    state = _run_to([StreamLoader(make_stream(image_shards, 0, 1, 1), num_workers=0)], 5)
    other = ShardStream(
        image_shards,
        decode=decode_key_bucket,
        collate=collate_list,
        batch_size=4,
        seed=5,
        shuffle_buffer=8,
        rank=0,
        world_size=1,
        num_workers=1,
        buckets=Buckets(((16, 16), (24, 12))),
    )
    assert StreamLoader(other, num_workers=0).load_state_dict(state) == "elastic"


def test_elastic_two_ranks_to_one_loses_and_repeats_nothing(tmp_path, image_shards):
    before = [
        StreamLoader(
            make_stream(image_shards, r, 2, 1, with_keys=True), num_workers=0, ledger=tmp_path / f"rank{r}.jsonl"
        )
        for r in range(2)
    ]
    for ld in before:  # ~0.7 epoch on each rank: mid-epoch, samples held in buckets
        for _ in range(10):
            next(ld)
    states = [ld.state_dict() for ld in before]
    assert any(st["readers"]["0"]["pending"] for st in states)
    after = StreamLoader(
        make_stream(image_shards, 0, 1, 1, with_keys=True), num_workers=0, ledger=tmp_path / "rank9.jsonl"
    )
    assert after.load_state_dict(states) == "elastic"
    for _ in range(4 * 120 // 4):
        next(after)

    counts: dict[int, Counter] = {}
    for path in sorted(tmp_path.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            for _source, epoch, _shard, _offset, key in json.loads(line)["keys"]:
                counts.setdefault(epoch, Counter())[key] += 1
    st = after.state_dict()["readers"]["0"]
    src = st["sources"][0]
    open_epochs = [it[0] for it in src["queue"]] + [n[0] for n in src["buffer"]]
    open_epochs += [nm[1] for names in st["pending"].values() for nm in names]
    last_full = (min(open_epochs) if open_epochs else src["next_epoch"]) - 1
    assert last_full >= 1
    for epoch, counter in counts.items():
        assert max(counter.values()) == 1, f"epoch {epoch}: a sample came twice"
        if epoch <= last_full:
            assert len(counter) == 120, f"epoch {epoch}: {120 - len(counter)} sample(s) missing"


def test_a_sample_without_a_size_is_named(tmp_path):
    write_shards(
        iter([{"__key__": "nosize", "txt": b"x"}] + [{"__key__": f"k{i}", "png": png(20, 20)} for i in range(3)]),
        tmp_path / "p",
        maxcount=10,
    )
    urls = sorted(str(p) for p in (tmp_path / "p").glob("*.tar"))
    s = ShardStream(
        ShardList(urls, None),
        decode=decode_key_bucket,
        collate=collate_list,
        batch_size=2,
        seed=0,
        shuffle_buffer=1,
        rank=0,
        world_size=1,
        num_workers=1,
        on_error="fail",
        buckets=BUCKETS,
    )
    with pytest.raises(DataError, match=r"sample 'nosize' in shard '.*\.tar': no size for its bucket.*'txt'"):
        next(iter(s))


# ------------------------------------------------------------------ from the recipe
def load(*overrides):
    from pathlib import Path

    from models.registry import workload_config_class
    from trainer.config import load_config

    recipe = Path(__file__).resolve().parents[1] / "configs/sd/tiny_vae.yaml"
    return load_config(
        recipe, ["run.dir=/tmp/unused", "data.train.urls=/tmp/unused", *overrides], model_schema=workload_config_class
    )


def test_recipe_keys_build_the_buckets_and_reach_the_stream(tmp_path):
    from types import SimpleNamespace

    from trainer.loop import build_loader

    write_shards(
        ({"__key__": f"s{j:06d}", "png": png(*SIZES[kind_of(j)], j)} for j in range(48)), tmp_path / "train", maxcount=6
    )
    cfg = load(
        f"data.train.urls={tmp_path / 'train'}",
        "data.buckets.side=16",
        "data.buckets.step=4",
        "data.batch_size=3",
        "data.num_workers=1",
        "data.transforms.crop=random",
    )
    loader = build_loader(cfg, SimpleNamespace(decode=decode_key_bucket, collate=collate_list), 0, 1)
    assert loader.stream.buckets.sizes == tuple(generate_buckets(area=256, step=4))
    assert loader.stream.transforms.crop == "random"
    for _ in range(10):
        batch = next(loader)
        assert len({bucket for _, bucket in batch}) == 1
    explicit = load("data.buckets.sizes=[[16,16],[24,12]]")
    assert explicit.data.buckets.sizes == [[16, 16], [24, 12]]


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.buckets.sizes=[[16]]", "data.buckets.sizes.0': [16] is not [width, height]"),
        ("data.buckets.area=64", "data.buckets': no bucket fits area=64"),
        ("data.buckets.max_ratio=0.5", "data.buckets.max_ratio': must be >= 1"),
        ("data.transforms.crop=left", "data.transforms.crop': 'left' is not center or random"),
        ("data.transforms.resize=fit", "data.transforms.resize': 'fit' is not cover or stretch"),
        ("data.transforms.hflip=1.5", "data.transforms.hflip': 1.5 is not a probability"),
    ],
)
def test_bad_bucket_and_transform_keys_are_named(override, message):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load(override)
