import json
import tarfile

from data_pipelines.shards import read_manifest, sha256_file, verify_shards, write_shards
from data_pipelines.stream import iter_raw_samples, resolve_shards


def _samples(n):
    for i in range(n):
        yield {"__key__": f"k{i:04d}", "txt": f"caption {i}", "json": {"i": i}, "cls": i % 7}


def test_round_trip_and_manifest(tmp_path):
    m = write_shards(_samples(25), tmp_path, maxcount=10)
    assert [s["samples"] for s in m["shards"]] == [10, 10, 5]
    assert m["total_samples"] == 25
    assert read_manifest(tmp_path) == m
    for s in m["shards"]:
        path = tmp_path / s["url"]
        assert s["bytes"] == path.stat().st_size
        assert s["sha256"] == sha256_file(path)
        with tarfile.open(path) as tar:  # a plain tar any tool can read
            assert len(tar.getnames()) == 3 * s["samples"]

    shards = resolve_shards(str(tmp_path))
    assert shards.samples_per_shard == [10, 10, 5]
    got = list(iter_raw_samples(shards.urls))
    assert [s["__key__"] for s in got] == [f"k{i:04d}" for i in range(25)]
    assert got[13]["txt"] == b"caption 13"
    assert json.loads(got[13]["json"]) == {"i": 13}
    assert got[13]["cls"] == b"6"


def test_brace_list_finds_manifest_counts(tmp_path):
    write_shards(_samples(25), tmp_path, maxcount=10)
    shards = resolve_shards(str(tmp_path / "shard-{000000..000002}.tar"))
    assert len(shards.urls) == 3 and shards.samples_per_shard == [10, 10, 5]


def test_verify_reports_each_bad_shard(tmp_path):
    m = write_shards(_samples(30), tmp_path, maxcount=10)
    assert verify_shards(tmp_path) == []
    first, second, third = (tmp_path / s["url"] for s in m["shards"])
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF
    first.write_bytes(bytes(data))  # bit flip, same size
    second.write_bytes(second.read_bytes()[:1000])  # truncated
    third.unlink()  # vanished
    problems = verify_shards(tmp_path)
    assert len(problems) == 3
    assert "sha256" in problems[0] and first.name in problems[0]
    assert "bytes" in problems[1] and second.name in problems[1]
    assert "missing" in problems[2] and third.name in problems[2]


def test_shards_are_reproducible(tmp_path):
    """Same samples, same bytes: shard checksums do not depend on when they were written."""
    a = write_shards(_samples(12), tmp_path / "a", maxcount=5)
    b = write_shards(_samples(12), tmp_path / "b", maxcount=5)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_min_shards_is_a_floor_where_there_are_samples():
    from data_pipelines.shards import samples_per_shard

    for n in (1, 7, 60, 100, 180, 256, 1257, 10_001):
        for least in (16, 20, 64):
            assert -(-n // samples_per_shard(n, 8, least)) >= min(n, least)
        assert samples_per_shard(n, 8) == -(-n // 8)  # the generated datasets' own counts, unchanged
    assert samples_per_shard(256, 1, 16) == 16 and samples_per_shard(10, 1, 16) == 1
