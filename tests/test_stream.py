import itertools
from collections import Counter

import pytest

from conftest import collate_list, decode_num, write_numbered_shards
from data_pipelines.stream import (DataError, ShardList, ShardStream, StreamLoader, eval_batches,
                                   resolve_shards)

COUNTS = [37, 5, 60, 12, 41, 8, 23, 30]  # deliberately uneven


@pytest.fixture
def shards(tmp_path):
    urls = write_numbered_shards(tmp_path, COUNTS)
    return ShardList(urls, list(COUNTS))


def make_stream(shards, rank, world, workers, batch=4, buffer=16, seed=3):
    return ShardStream(shards, decode=decode_num, collate=collate_list, batch_size=batch,
                       seed=seed, shuffle_buffer=buffer, rank=rank, world_size=world,
                       num_workers=workers)


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_each_epoch_is_split_disjointly_over_ranks_and_workers(shards, world, workers):
    total = sum(COUNTS)
    for epoch in range(3):
        seen = Counter()
        for rank in range(world):
            s = make_stream(shards, rank, world, workers)
            for w in range(workers):
                n = sum(COUNTS[i] for i in s.reader_shards(epoch, w))
                # skip whole earlier epochs, then take exactly this reader's epoch
                skip = sum(sum(COUNTS[i] for i in s.reader_shards(e, w)) for e in range(epoch))
                seen.update(itertools.islice(s.reader_samples(w, skip=skip), n))
        assert sorted(seen) == list(range(total)), f"epoch {epoch}: a sample is missing"
        assert set(seen.values()) == {1}, f"epoch {epoch}: a sample came twice"


def test_epochs_are_reshuffled(shards):
    s = make_stream(shards, 0, 1, 1)
    first = list(itertools.islice(s.reader_samples(0), sum(COUNTS)))
    second = list(itertools.islice(s.reader_samples(0, skip=sum(COUNTS)), sum(COUNTS)))
    assert sorted(first) == sorted(second) and first != second


def test_uneven_ranks_still_get_equal_batch_counts(tmp_path):
    # one rank owns the big shard, the other two tiny ones: both must keep producing
    urls = write_numbered_shards(tmp_path, [200, 3, 3, 3])
    shards = ShardList(urls, [200, 3, 3, 3])
    for rank in range(2):
        batches = list(itertools.islice(iter(make_stream(shards, rank, 2, 1, batch=8)), 50))
        assert len(batches) == 50 and all(len(b) == 8 for b in batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(shards, workers):
    """Batches k.. of a resumed loader equal those of an uninterrupted one (real workers)."""
    full = StreamLoader(make_stream(shards, 1, 2, workers), num_workers=workers)
    reference = [next(full) for _ in range(60)]
    for k in (1, 7, 33):
        state = dict(full.state_dict(), batches=k)
        resumed = StreamLoader(make_stream(shards, 1, 2, workers), num_workers=workers)
        resumed.load_state_dict(state)
        assert [next(resumed) for _ in range(60 - k)] == reference[k:]


def test_resume_with_other_world_size_is_refused(shards):
    state = StreamLoader(make_stream(shards, 0, 2, 1), num_workers=1).state_dict()
    other = StreamLoader(make_stream(shards, 0, 1, 1), num_workers=1)
    with pytest.raises(DataError, match="world_size=2"):
        other.load_state_dict(state)


def test_too_few_shards_is_a_clear_error(tmp_path):
    urls = write_numbered_shards(tmp_path, [5, 5, 5])
    with pytest.raises(DataError, match=r"data\.train\.urls: 3 shard\(s\) cannot feed 2 rank\(s\) x 2"):
        make_stream(ShardList(urls, None), 0, 2, 2)


def test_missing_shard_and_empty_list_are_named(tmp_path):
    with pytest.raises(DataError, match="empty URL list"):
        resolve_shards("", key="data.train.urls")
    with pytest.raises(DataError, match="nothing-000000.tar.*does not exist"):
        resolve_shards(str(tmp_path / "nothing-{000000..000001}.tar"))


def test_undecodable_sample_names_shard_and_key(tmp_path):
    urls = write_numbered_shards(tmp_path, [5, 5])

    def bad(sample):
        if sample["__key__"] == "s000007":
            raise ValueError("boom")
        return decode_num(sample)

    s = ShardStream(ShardList(urls, None), decode=bad, collate=collate_list, batch_size=1, seed=0,
                    shuffle_buffer=1, rank=0, world_size=1, num_workers=1)
    with pytest.raises(DataError, match=r"s000007.*p1-000000\.tar.*boom"):
        list(itertools.islice(s.reader_samples(0), 10))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_split_covers_everything_once(shards, world):
    seen = []
    for rank in range(world):
        for batch in eval_batches(shards, decode=decode_num, collate=collate_list, batch_size=7,
                                  rank=rank, world_size=world):
            seen += batch
    assert sorted(seen) == list(range(sum(COUNTS)))


def test_pipe_urls_are_read(shards):
    """`pipe:` URLs (any command writing a tar to stdout) read like local files."""
    piped = ShardList([f"pipe:cat {u}" for u in shards.urls], list(COUNTS))
    seen = []
    for batch in eval_batches(piped, decode=decode_num, collate=collate_list, batch_size=50,
                              rank=0, world_size=1):
        seen += batch
    assert seen == list(range(sum(COUNTS)))


def test_too_few_shards_fails_before_launch(tmp_path, digits_dir, cpu_env):
    """The preflight refuses 8 shards for 4 ranks x 4 workers without starting anything."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(cpu_env, WORLD_SIZE="4")
    out = subprocess.run([sys.executable, "-m", "launch.train", "--config",
                          str(root / "configs/autoregressive/made.yaml"), f"run.dir={tmp_path}/r",
                          f"data.train.urls={digits_dir}/train", f"data.val.urls={digits_dir}/val",
                          f"data.test.urls={digits_dir}/test", "data.num_workers=4"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "data.train.urls: 8 shard(s) cannot feed 4 rank(s) x 4 worker(s)" in out.stderr
