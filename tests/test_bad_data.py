"""Bad data: every case is either counted and logged with its shard and key (skip), or
stops with an error naming them (fail). Nothing crashes without saying where."""

import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import collate_list, write_numbered_shards
from data_pipelines.stream import DataError, ShardList, ShardStream, resolve_shards

ROOT = Path(__file__).resolve().parents[1]


def decode_strict(sample):
    if "num" not in sample:
        raise KeyError("num")
    value = int(sample["num"])  # a non-number is "undecodable"
    return value


def stream(urls, policy, counts=None):
    return ShardStream(ShardList(urls, counts), decode=decode_strict, collate=collate_list,
                       batch_size=1, seed=0, shuffle_buffer=1, rank=0, world_size=1,
                       num_workers=1, on_error=policy)


def first_epoch(s):
    """Values of epoch 0 (read until the first sample of epoch 1), and the skip counters."""
    samples, snapshot = s.role_samples(0)
    values = []
    for value, name in samples:
        if name[1] > 0:
            return values, snapshot()["sources"][0]["stats"]
        values.append(value)


def shards_with(tmp_path, bad_sample):
    """Two shards of 5; sample s000007 replaced by `bad_sample`."""
    from data_pipelines.shards import write_shards

    urls = []
    for i, rng in enumerate((range(0, 5), range(5, 10))):
        samples = [{"__key__": f"s{j:06d}", "num": str(j).encode()} for j in rng]
        samples = [dict(bad_sample, __key__=s["__key__"]) if s["__key__"] == "s000007" else s
                   for s in samples]
        write_shards(samples, tmp_path / f"p{i}", maxcount=5)
        urls.append(str(tmp_path / f"p{i}" / "shard-000000.tar"))
    return urls


@pytest.mark.parametrize("bad, kind, words", [
    ({"num": b"not-a-number"}, "bad_samples", "cannot decode"),
    ({"txt": b"a caption but no num"}, "missing_key", "missing key 'num'"),
])
def test_bad_sample(tmp_path, caplog, bad, kind, words):
    urls = shards_with(tmp_path, bad)
    with caplog.at_level(logging.WARNING):
        values, stats = first_epoch(stream(urls, "skip"))
    assert sorted(values) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert stats == {kind: 1}
    assert "s000007" in caplog.text and "p1/shard-000000.tar" in caplog.text and words in caplog.text
    with pytest.raises(DataError, match=rf"s000007.*p1/shard-000000\.tar.*{words}"):
        first_epoch(stream(urls, "fail"))


@pytest.mark.parametrize("cut", [3 * 1024 + 700, 3 * 1024 + 100, 3 * 1024],
                         ids=["in_data", "in_header", "at_boundary"])
def test_truncated_tar(tmp_path, caplog, cut):
    """Cut inside a member's data, inside a header, or exactly between members: the last
    one Python's tarfile takes for a clean end, so the manifest count must catch it."""
    urls = write_numbered_shards(tmp_path, [6, 6])
    Path(urls[1]).write_bytes(Path(urls[1]).read_bytes()[:cut])  # 1,024 bytes a sample (header + data)
    with caplog.at_level(logging.WARNING):
        values, stats = first_epoch(stream(urls, "skip", counts=[6, 6]))
    assert sorted(values) == [0, 1, 2, 3, 4, 5, 6, 7, 8] and stats == {"bad_shards": 1}
    assert "p1-000000.tar" in caplog.text and "unreadable after 3 samples" in caplog.text
    with pytest.raises(DataError, match=r"p1-000000\.tar.*unreadable after 3 samples"):
        first_epoch(stream(urls, "fail", counts=[6, 6]))


def test_shard_vanished_between_epochs(tmp_path, caplog):
    urls = write_numbered_shards(tmp_path, [4, 4, 4])
    samples, snapshot = stream(urls, "skip").role_samples(0)
    first = [v for v, _ in itertools.islice(samples, 12)]
    assert sorted(first) == list(range(12))
    Path(urls[2]).unlink()
    with caplog.at_level(logging.WARNING):
        second = [v for v, _ in itertools.islice(samples, 8)]
    assert sorted(second) == list(range(8)) and snapshot()["sources"][0]["stats"] == {"missing_shards": 1}
    assert "p2-000000.tar" in caplog.text and "cannot open" in caplog.text

    samples, _ = stream(urls, "fail").role_samples(0)
    with pytest.raises(DataError, match=r"p2-000000\.tar.*cannot open"):
        list(itertools.islice(samples, 24))


def test_empty_url_list_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"data\.train\.urls: empty URL list"):
        resolve_shards("", key="data.train.urls")
    with pytest.raises(DataError, match=r"has no manifest\.json"):
        resolve_shards(str(tmp_path), key="data.train.urls")


def test_all_shards_unreadable_is_an_error_not_a_hang(tmp_path):
    urls = write_numbered_shards(tmp_path, [3, 3])
    for u in urls:
        Path(u).write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DataError, match="no readable samples"):
        first_epoch(stream(urls, "skip"))


def test_skips_are_counted_in_metrics_and_tensorboard(tmp_path, digits_dir, cpu_env):
    """A real run over damaged digits shards: skip counters reach metrics.jsonl and TB; with
    on_error=fail the run stops naming shard and key."""
    import shutil

    from data_pipelines.shards import write_shards
    from data_pipelines.stream import iter_raw_samples

    train = tmp_path / "train"
    shutil.copytree(digits_dir / "train", train)
    victim = sorted(train.glob("shard-*.tar"))[3]
    samples = list(iter_raw_samples([str(victim)]))
    samples[5]["png"] = b"garbage, not a png"
    write_shards(({k: v for k, v in s.items() if k != "__url__"} for s in samples),
                 tmp_path / "tmp", prefix="x", maxcount=1000)
    shutil.copy(tmp_path / "tmp" / "x-000000.tar", victim)

    cmd = [sys.executable, "-m", "launch.train", "--config", str(ROOT / "configs/autoregressive/made.yaml"),
           f"data.train.urls={train}", f"data.val.urls={digits_dir}/val", f"data.test.urls={digits_dir}/test",
           "model.hidden=[32]", "trainer.progress_bar=false", "optim.warmup_steps=2", "trainer.max_steps=60",
           "trainer.log_every=20", "trainer.eval_every=0", "trainer.sample_every=0",
           "trainer.checkpoint_every=0", "data.batch_size=32"]
    run_dir = tmp_path / "skip"
    out = subprocess.run(cmd + [f"run.dir={run_dir}"], cwd=ROOT, env=cpu_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"'{samples[5]['__key__']}'" in out.stderr and victim.name in out.stderr
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line][-1]
    # 60 x 32 samples = 1.5 epochs: the damaged sample was met once or twice, never silently
    assert last["data/skipped_bad_samples"] in (1, 2)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("data/skipped_bad_samples")[-1].value == last["data/skipped_bad_samples"]

    out = subprocess.run(cmd + [f"run.dir={tmp_path / 'fail'}", "data.on_error=fail"], cwd=ROOT,
                         env=cpu_env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "error:" in out.stderr and samples[5]["__key__"] in out.stderr and victim.name in out.stderr


@pytest.mark.parametrize("name", ["pipe:touch PWNED", "../elsewhere/s-000000.tar", "/etc/s.tar",
                                  "https://example.com/s.tar"])
def test_a_manifest_cannot_name_commands_or_files_outside_its_folder(tmp_path, digits_dir, name):
    """Shard folders are data, maybe someone else's: their manifest.json names files inside
    the folder and nothing else; `pipe:` commands come only from the recipe."""
    folder = tmp_path / "shards"
    folder.mkdir()
    manifest = json.loads((digits_dir / "val" / "manifest.json").read_text())
    manifest["shards"][0]["url"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"data\.val\.urls: manifest .* names shard .*refusing it"):
        resolve_shards(str(folder), key="data.val.urls")
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_a_workloads_own_reads_follow_the_error_policy(tmp_path):
    """What the trainer hands a workload (bind_splits: iter_samples) decodes under the run's
    data.on_error: skip leaves the bad sample out, fail names it."""
    from data_pipelines.stream import iter_samples

    urls = shards_with(tmp_path, {"num": b"not-a-number"})
    assert list(iter_samples(urls, "skip", decode=decode_strict)) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert [s["__key__"] for s in iter_samples(urls, "skip")][7] == "s000007"  # raw: nothing decoded
    with pytest.raises(DataError, match="sample 's000007'.*cannot decode"):
        list(iter_samples(urls, "fail", decode=decode_strict))
