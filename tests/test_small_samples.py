"""Small samples made cheap: our in-memory tar reader against webdataset's, batches decoded at
once against sample by sample (the same batches, the same skips and resumes), the digits'
.npy field against their PNG, and batches through a worker's pipe by value."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from conftest import collate_list, decode_num, write_numbered_shards
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipelines.decode import npy_array
from data_pipelines.stream import (
    ErrorPolicy,
    ShardList,
    ShardStream,
    StreamBatch,
    StreamLoader,
    iter_raw_samples,
    plain_tar_samples,
    resolve_shards,
    shard_samples,
)
from models.autoregressive import MADEConfig, MADEWorkload

COUNTS = [37, 5, 60, 12]


def webdataset_samples(path) -> list[dict]:
    with open(path, "rb") as f:
        return list(group_by_keys(tar_file_expander([{"url": str(path), "stream": f}])))


def test_our_tar_reader_gives_what_webdataset_gives(digits_dir):
    for path in sorted(digits_dir.glob("*/*.tar")):
        ours = plain_tar_samples(path.read_bytes(), str(path))
        assert ours is not None and ours == webdataset_samples(path)


def tar_with(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT, mtime: float = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_anything_unusual_is_left_to_tarfile(tmp_path):
    """PAX headers, a long name, a cut at a member boundary, a damaged checksum, a field twice:
    our reader declines (None) and shard_samples gives webdataset's samples or its error."""
    members = [("a.txt", b"1"), ("a.json", b"{}"), ("b.txt", b"2")]
    plain = tar_with(members)
    assert [s["__key__"] for s in plain_tar_samples(plain, "u")] == ["a", "b"]
    damaged = bytearray(plain)
    damaged[0] ^= 1  # the first name: its checksum no longer matches
    cases = {
        "pax": tar_with(members, tarfile.PAX_FORMAT, mtime=1.5),
        "long_name": tar_with([("d/" + "x" * 120 + ".txt", b"1")], tarfile.GNU_FORMAT),
        "cut": plain[: 3 * 1024],
        "checksum": bytes(damaged),
        "twice": tar_with([("a.txt", b"1"), ("a.txt", b"2")]),
    }
    for name, data in cases.items():
        assert plain_tar_samples(data, "u") is None, name
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        policy = ErrorPolicy("skip", {})
        got = list(shard_samples(str(path), policy))
        if name in ("pax", "long_name"):
            assert got == webdataset_samples(path) and got and not policy.failed
        else:
            assert policy.failed or name == "cut", name  # a cut at a boundary needs the manifest's count
    policy = ErrorPolicy("skip", {})
    assert len(list(shard_samples(str(tmp_path / "cut.tar"), policy, expected=3))) == 2
    assert "truncated" in policy.why_nothing()


def test_a_shard_rewritten_in_place_is_read_again(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_with([("a.txt", b"1")]))
    assert [s["txt"] for s in shard_samples(str(path), ErrorPolicy("fail", {}))] == [b"1"]
    path.write_bytes(tar_with([("a.txt", b"2")]))
    assert [s["txt"] for s in shard_samples(str(path), ErrorPolicy("fail", {}))] == [b"2"]


def decode_batch_num(raws: list[dict]) -> list:
    """decode_num over a batch, refusing one with a bad sample (the stream then goes one by one)."""
    return [int(r["num"]) for r in raws]


def decode_strict(sample: dict) -> int:
    if int(sample["num"]) % 17 == 3:
        raise ValueError("unlucky")
    return int(sample["num"])


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_decode_gives_the_same_batches_skips_and_resumes(tmp_path, workers):
    shards = ShardList(write_numbered_shards(tmp_path, COUNTS), list(COUNTS))

    def loader(decode, decode_batch):
        stream = ShardStream(
            shards,
            decode=decode,
            collate=collate_list,
            decode_batch=decode_batch,
            batch_size=4,
            seed=3,
            shuffle_buffer=16,
            rank=1,
            world_size=2,
            num_workers=workers,
            with_keys=True,
            on_error="skip",
        )
        return StreamLoader(stream, num_workers=workers)

    def batch_strict(raws):
        return [decode_strict(r) for r in raws]

    for decode, decode_batch in ((decode_num, decode_batch_num), (decode_strict, batch_strict)):
        one_by_one = loader(decode, None)
        reference = [next(one_by_one) for _ in range(60)]
        batched = loader(decode, decode_batch)
        assert [next(batched) for _ in range(60)] == reference
        assert batched.stats() == one_by_one.stats()
        resumed = loader(decode, decode_batch)
        partial = loader(decode, decode_batch)
        for _ in range(21):
            next(partial)
        assert resumed.load_state_dict([partial.state_dict(), partial.state_dict()]) == "exact"
        assert [next(resumed) for _ in range(39)] == reference[21:]
    assert one_by_one.stats().get("bad_samples", 0) > 0


def test_digits_npy_and_png_decode_alike_and_old_shards_still_read(digits_dir, tmp_path):
    from data_pipelines.shards import write_shards
    from data_pipelines.sources.digits import binarized_digits, split_indices

    workload = MADEWorkload(MADEConfig())
    raws = list(iter_raw_samples(resolve_shards(str(digits_dir / "test")).urls))
    assert all("npy" in r and "png" in r for r in raws)
    images, _ = binarized_digits()
    expected = torch.from_numpy(images[split_indices()["test"]].reshape(-1, 64)).float()
    old = [{k: v for k, v in r.items() if k not in ("npy", "__url__")} for r in raws]
    write_shards(iter(old), tmp_path / "old", maxcount=1000)  # as make_shards wrote them before
    old = list(iter_raw_samples(resolve_shards(str(tmp_path / "old")).urls))
    assert "npy" not in old[0]
    assert torch.equal(workload.decode_batch(raws), expected)
    assert torch.equal(torch.stack([workload.decode(r) for r in raws]), expected)
    assert torch.equal(workload.decode_batch(old), expected)
    assert torch.equal(workload.decode_batch(raws[:3] + old[3:7]), expected[:7])
    buf = io.BytesIO()
    np.save(buf, np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match=r"\(8, 9\)"):
        workload.decode_batch(raws[:2] + [{"npy": buf.getvalue()}])
    with pytest.raises(ValueError, match="not a .npy field"):
        npy_array(b"garbage")


def test_small_tensors_cross_the_pipe_by_value():
    data = {"x": torch.rand(3, 4), "y": [torch.arange(3), "a"], "z": (torch.zeros(2, dtype=torch.bfloat16),)}
    got = pickle.loads(pickle.dumps(StreamBatch(data, 1, {"s": 1}, ["k"])))
    assert (got.role, got.state, got.keys) == (1, {"s": 1}, ["k"])
    assert torch.equal(got.data["x"], data["x"]) and torch.equal(got.data["y"][0], data["y"][0])
    assert got.data["y"][1] == "a" and got.data["z"][0].dtype == torch.bfloat16
