import copy
import itertools
from collections import Counter
from pathlib import Path

import pytest
from conftest import collate_list, decode_num, write_numbered_shards

from data_pipelines.stream import DataError, ShardList, ShardStream, StreamLoader, eval_batches, resolve_shards

COUNTS = [37, 5, 60, 12, 41, 8, 23, 30]  # deliberately uneven


@pytest.fixture
def shards(tmp_path):
    urls = write_numbered_shards(tmp_path, COUNTS)
    return ShardList(urls, list(COUNTS))


def make_stream(shards, rank, world, workers, batch=4, buffer=16, seed=3):
    return ShardStream(
        shards,
        decode=decode_num,
        collate=collate_list,
        batch_size=batch,
        seed=seed,
        shuffle_buffer=buffer,
        rank=rank,
        world_size=world,
        num_workers=workers,
    )


def epochs_of(stream, role, n_epochs):
    """Samples of one reader, grouped by the epoch in their names, for epochs < n_epochs."""
    samples, _ = stream.role_samples(role)
    by_epoch = {}
    for value, name in samples:
        epoch = name[1]
        if epoch >= n_epochs:
            return by_epoch
        by_epoch.setdefault(epoch, []).append(value)


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_each_epoch_is_split_disjointly_over_ranks_and_workers(shards, world, workers):
    total = sum(COUNTS)
    seen = {e: Counter() for e in range(3)}
    for rank in range(world):
        s = make_stream(shards, rank, world, workers)
        for role in range(workers):
            for epoch, values in epochs_of(s, role, 3).items():
                assert sorted(values) == sorted(
                    v for i in s.reader_shards(epoch, role) for v in range(sum(COUNTS[:i]), sum(COUNTS[: i + 1]))
                )
                seen[epoch].update(values)
    for epoch, counter in seen.items():
        assert sorted(counter) == list(range(total)), f"epoch {epoch}: a sample is missing"
        assert set(counter.values()) == {1}, f"epoch {epoch}: a sample came twice"


def test_epochs_are_reshuffled(shards):
    by_epoch = epochs_of(make_stream(shards, 0, 1, 1), 0, 2)
    assert sorted(by_epoch[0]) == sorted(by_epoch[1]) and by_epoch[0] != by_epoch[1]


def test_uneven_ranks_still_get_equal_batch_counts(tmp_path):
    # one rank owns the big shard, the other two tiny ones: both must keep producing
    urls = write_numbered_shards(tmp_path, [200, 3, 3, 3])
    shards = ShardList(urls, [200, 3, 3, 3])
    for rank in range(2):
        batches = list(itertools.islice(iter(make_stream(shards, rank, 2, 1, batch=8)), 50))
        assert len(batches) == 50 and all(len(b.data) == 8 for b in batches)


def _states_after(loaders, k):
    for loader in loaders:
        while loader.batches < k:
            next(loader)
    return [copy.deepcopy(loader.state_dict()) for loader in loaders]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(shards, workers):
    """Batches k.. of a resumed loader equal those of an uninterrupted one (real workers)."""
    ref = [StreamLoader(make_stream(shards, r, 2, workers), num_workers=workers) for r in range(2)]
    states = {k: _states_after(ref, k) for k in (1, 7, 33)}
    _states_after(ref, 60)
    full = StreamLoader(make_stream(shards, 1, 2, workers), num_workers=workers)
    reference = [next(full) for _ in range(60)]
    for k, rank_states in states.items():
        resumed = StreamLoader(make_stream(shards, 1, 2, workers), num_workers=workers)
        assert resumed.load_state_dict(rank_states) == "exact"
        assert [next(resumed) for _ in range(60 - k)] == reference[k:]


def test_resume_with_other_shards_or_seed_is_refused(shards):
    state = StreamLoader(make_stream(shards, 0, 1, 1), num_workers=1).state_dict()
    other = StreamLoader(make_stream(shards, 0, 1, 1, seed=4), num_workers=1)
    with pytest.raises(DataError, match="seed=3"):
        other.load_state_dict([state])


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

    s = ShardStream(
        ShardList(urls, None),
        decode=bad,
        collate=collate_list,
        batch_size=1,
        seed=0,
        shuffle_buffer=1,
        rank=0,
        world_size=1,
        num_workers=1,
        on_error="fail",
    )
    with pytest.raises(DataError, match=r"s000007.*p1-000000\.tar.*boom"):
        list(itertools.islice(s.role_samples(0)[0], 10))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_split_covers_everything_once(shards, world):
    seen = []
    for rank in range(world):
        for batch in eval_batches(
            shards, decode=decode_num, collate=collate_list, batch_size=7, rank=rank, world_size=world
        ):
            seen += batch
    assert sorted(seen) == list(range(sum(COUNTS)))


def test_pipe_urls_are_read(shards):
    """`pipe:` URLs (any command writing a tar to stdout) read like local files."""
    piped = ShardList([f"pipe:cat {u}" for u in shards.urls], list(COUNTS))
    seen = []
    for batch in eval_batches(piped, decode=decode_num, collate=collate_list, batch_size=50, rank=0, world_size=1):
        seen += batch
    assert seen == list(range(sum(COUNTS)))


def test_too_few_shards_fails_before_launch(tmp_path, digits_dir, cpu_env):
    """The preflight refuses 8 shards for 4 ranks x 4 workers without starting anything."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(cpu_env, WORLD_SIZE="4")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--config",
            str(root / "configs/autoregressive/made.yaml"),
            f"run.dir={tmp_path}/r",
            f"data.train.urls={digits_dir}/train",
            f"data.val.urls={digits_dir}/val",
            f"data.test.urls={digits_dir}/test",
            "data.num_workers=4",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "data.train.urls: 8 shard(s) cannot feed 4 rank(s) x 4 worker(s)" in out.stderr


def _ledger_counts(folder):
    """Per epoch, how often each sample id was delivered (from the loaders' ledgers)."""
    import json

    counts = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            for _source, epoch, _shard, _offset, key in json.loads(line)["keys"]:
                counts.setdefault(epoch, Counter())[int(key[1:])] += 1
    return counts


@pytest.mark.parametrize(
    "old, new", [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 1), (2, 3)), ((2, 2), (3, 0))], ids=lambda x: f"{x[0]}x{x[1]}"
)
def test_elastic_resume_delivers_every_remaining_sample_once(tmp_path, shards, old, new):
    """Stop mid-epoch on one layout, go on with other ranks/workers: per epoch, every
    sample exactly once (counted by name), however the ranks had drifted apart."""
    (w0, k0), (w1, k1) = old, new
    total = sum(COUNTS)

    def loader(rank, world, workers, batch, ledger):
        s = ShardStream(
            shards,
            decode=decode_num,
            collate=collate_list,
            batch_size=batch,
            seed=3,
            shuffle_buffer=16,
            rank=rank,
            world_size=world,
            num_workers=workers,
            with_keys=True,
        )
        return StreamLoader(s, num_workers=workers, ledger=ledger)

    before = [loader(r, w0, k0, 4, tmp_path / f"rank{r}.jsonl") for r in range(w0)]
    for ld in before:  # ~1.4 epochs in all: ranks end in different epochs, mid-shard
        for _ in range(300 // (4 * w0)):
            next(ld)
    states = [ld.state_dict() for ld in before]

    batch = 12 // w1  # global batch 12 after the change
    after = [loader(r, w1, k1, batch, tmp_path / f"rank{r + 10}.jsonl") for r in range(w1)]
    for ld in after:
        assert ld.load_state_dict(states) == "elastic"
        for _ in range(4 * total // (batch * w1)):
            next(ld)

    counts = _ledger_counts(tmp_path)
    # epochs below every reader's current one are finished (readers drift apart freely)
    in_progress = []
    for ld in after:
        for st in ld.state_dict()["readers"].values():
            src = st["sources"][0]
            pending = [item[0] for item in src["queue"]] + [name[0] for name in src["buffer"]]
            in_progress.append(min(pending) if pending else src["next_epoch"])
    last_full = min(in_progress) - 1
    assert last_full >= 1
    for epoch, counter in counts.items():
        assert max(counter.values()) == 1, f"epoch {epoch}: a sample came twice"
        if epoch <= last_full:
            assert sorted(counter) == list(range(total)), f"epoch {epoch}: samples missing"


def test_position_is_small_and_does_not_grow(shards):
    """The saved position is a few hundred numbers, whatever has been read before."""
    import json

    ld = StreamLoader(make_stream(shards, 0, 1, 1), num_workers=0)
    sizes = []
    for _ in range(4):
        for _ in range(100):
            next(ld)
        sizes.append(len(json.dumps(ld.state_dict())))
    assert max(sizes) < 8000 and max(sizes) < 2 * min(sizes)


def test_weighted_mixture_keeps_each_source_exact(tmp_path):
    """Two datasets mixed 3:1: the draw follows the weights, and within each source every
    epoch still delivers each of its samples once."""
    from data_pipelines.stream import Source

    a = ShardList(write_numbered_shards(tmp_path / "a", [30, 30]), [30, 30])
    b = ShardList(write_numbered_shards(tmp_path / "b", [10, 10]), [10, 10])
    s = ShardStream(
        [Source(a, 3.0, "a"), Source(b, 1.0, "b")],
        decode=decode_num,
        collate=collate_list,
        batch_size=4,
        seed=0,
        shuffle_buffer=8,
        rank=0,
        world_size=1,
        num_workers=1,
    )
    samples, _ = s.role_samples(0)
    names = [name for _, name in itertools.islice(samples, 4000)]
    share_a = sum(1 for n in names if n[0] == 0) / len(names)
    assert 0.72 < share_a < 0.78
    for source, size in ((0, 60), (1, 20)):
        epochs = {}
        for n in names:
            if n[0] == source:
                epochs.setdefault(n[1], Counter())[n[4]] += 1
        for epoch in sorted(epochs)[:-1]:  # the last one may be unfinished
            assert len(epochs[epoch]) == size and max(epochs[epoch].values()) == 1


def test_resampled_mode_draws_with_replacement_and_resumes(shards):
    s = make_stream(shards, 0, 1, 1)
    s.resampled = True
    samples, _ = s.role_samples(0)
    shard_ids = [name[2] for _, name in itertools.islice(samples, 2000)]
    runs = [shard_ids[0]] + [b for a, b in zip(shard_ids, shard_ids[1:]) if a != b]
    assert len(runs) > len(set(runs))  # some shard was drawn again before all were read

    def loader():
        st = make_stream(shards, 0, 1, 1)
        st.resampled = True
        return StreamLoader(st, num_workers=0)

    full = loader()
    ref = [next(full) for _ in range(50)]
    part = loader()
    for _ in range(20):
        next(part)
    resumed = loader()
    assert resumed.load_state_dict([part.state_dict()]) == "exact"
    assert [next(resumed) for _ in range(30)] == ref[20:]


def test_fsspec_urls_are_read(shards):
    """A URL scheme that webdataset does not know goes through fsspec (memory:// here;
    s3:// and gs:// the same way once s3fs or gcsfs is installed)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    urls = []
    for i, url in enumerate(shards.urls):
        fs.pipe(f"/shards/{i}.tar", Path(url).read_bytes())
        urls.append(f"memory:///shards/{i}.tar")
    seen = []
    for batch in eval_batches(
        ShardList(urls, None), decode=decode_num, collate=collate_list, batch_size=64, rank=0, world_size=1
    ):
        seen += batch
    assert seen == list(range(sum(COUNTS)))


def decode_with_worker(sample):
    """(value, the worker's pid, whether the worker ignores SIGINT)."""
    import os
    import signal

    return int(sample["num"]), os.getpid(), signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_loader_workers_ignore_ctrl_c(shards):
    """Ctrl-C signals the whole foreground process group: the main process handles it
    (stop and save); a worker must neither die of it nor print a traceback."""
    import os
    import signal
    import time

    stream = ShardStream(
        shards,
        decode=decode_with_worker,
        collate=collate_list,
        batch_size=4,
        seed=3,
        shuffle_buffer=16,
        rank=0,
        world_size=1,
        num_workers=2,
    )
    loader = StreamLoader(stream, num_workers=2, prefetch_factor=1)
    before = [s for _ in range(4) for s in next(loader)]
    workers = {pid for _, pid, _ in before}
    assert len(workers) == 2 and os.getpid() not in workers
    assert all(ignores for _, _, ignores in before)
    for pid in workers:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    after = [s for _ in range(20) for s in next(loader)]  # past what was prefetched
    assert {pid for _, pid, _ in after} == workers
