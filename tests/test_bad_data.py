"""Bad data: every case is either counted and logged with its shard and key (skip), or
stops with an error naming them (fail). Nothing crashes without saying where."""

import itertools
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import collate_list, write_numbered_shards

from data_pipelines.stream import DataError, ShardList, ShardStream, resolve_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_skip_log(monkeypatch):
    """Each test starts with no skips logged in this process: the stream logs only the first
    few of a kind, and tests that ran before (in any module) may have used them up."""
    from collections import Counter

    from data_pipelines import stream as stream_module

    monkeypatch.setattr(stream_module, "_skips_seen", Counter())


def decode_strict(sample):
    if "num" not in sample:
        raise KeyError("num")
    value = int(sample["num"])  # a non-number is "undecodable"
    return value


def stream(urls, policy, counts=None):
    return ShardStream(
        ShardList(urls, counts),
        decode=decode_strict,
        collate=collate_list,
        batch_size=1,
        seed=0,
        shuffle_buffer=1,
        rank=0,
        world_size=1,
        num_workers=1,
        on_error=policy,
    )


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
        samples = [dict(bad_sample, __key__=s["__key__"]) if s["__key__"] == "s000007" else s for s in samples]
        write_shards(samples, tmp_path / f"p{i}", maxcount=5)
        urls.append(str(tmp_path / f"p{i}" / "shard-000000.tar"))
    return urls


@pytest.mark.parametrize(
    "bad, kind, words",
    [
        ({"num": b"not-a-number"}, "bad_samples", "cannot decode"),
        ({"txt": b"a caption but no num"}, "missing_key", "missing key 'num'"),
    ],
)
def test_bad_sample(tmp_path, caplog, bad, kind, words):
    urls = shards_with(tmp_path, bad)
    with caplog.at_level(logging.WARNING):
        values, stats = first_epoch(stream(urls, "skip"))
    assert sorted(values) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert stats == {kind: 1}
    assert "s000007" in caplog.text and "p1/shard-000000.tar" in caplog.text and words in caplog.text
    with pytest.raises(DataError, match=rf"s000007.*p1/shard-000000\.tar.*{words}"):
        first_epoch(stream(urls, "fail"))


@pytest.mark.parametrize("cut", [3 * 1024 + 700, 3 * 1024 + 100, 3 * 1024], ids=["in_data", "in_header", "at_boundary"])
def test_truncated_tar(tmp_path, caplog, cut):
    """Cut inside a member's data, inside a header, or exactly between members: the last
    one Python's tarfile takes for a clean end, so the manifest count must catch it."""
    urls = write_numbered_shards(tmp_path, [6, 6])
    Path(urls[1]).write_bytes(Path(urls[1]).read_bytes()[:cut])  # 1,024 bytes a sample (header + data)
    with caplog.at_level(logging.WARNING):
        values, stats = first_epoch(stream(urls, "skip", counts=[6, 6]))
    assert sorted(values) == [0, 1, 2, 3, 4, 5, 6, 7, 8] and stats == {"bad_shards": 1}
    assert re.search(r"p1-000000\.tar': truncated: .*after 3 sample\(s\)", caplog.text)
    with pytest.raises(DataError, match=r"p1-000000\.tar': truncated: .*after 3 sample\(s\)"):
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
    for field in ("npy", "png"):  # the picture, in each field the digits shards hold it
        samples[5][field] = b"garbage, not a picture"
    write_shards(
        ({k: v for k, v in s.items() if k != "__url__"} for s in samples), tmp_path / "tmp", prefix="x", maxcount=1000
    )
    shutil.copy(tmp_path / "tmp" / "x-000000.tar", victim)

    cmd = [
        sys.executable,
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/autoregressive/made.yaml"),
        f"data.train.urls={train}",
        f"data.val.urls={digits_dir}/val",
        f"data.test.urls={digits_dir}/test",
        "model.hidden=[32]",
        "trainer.progress_bar=false",
        "optim.warmup_steps=2",
        "trainer.max_steps=60",
        "trainer.log_every=20",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=0",
        "data.batch_size=32",
    ]
    run_dir = tmp_path / "skip"
    out = subprocess.run(
        cmd + [f"run.dir={run_dir}"], cwd=ROOT, env=cpu_env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"'{samples[5]['__key__']}'" in out.stderr and victim.name in out.stderr
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in line][
        -1
    ]
    # 60 x 32 samples = 1.5 epochs: the damaged sample was met once or twice, never silently
    assert last["data/skipped_bad_samples"] in (1, 2)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("data/skipped_bad_samples")[-1].value == last["data/skipped_bad_samples"]

    out = subprocess.run(
        cmd + [f"run.dir={tmp_path / 'fail'}", "data.on_error=fail"],
        cwd=ROOT,
        env=cpu_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "error:" in out.stderr and samples[5]["__key__"] in out.stderr and victim.name in out.stderr


@pytest.mark.parametrize(
    "name", ["pipe:touch PWNED", "../elsewhere/s-000000.tar", "/etc/s.tar", "https://example.com/s.tar"]
)
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


# --- errors that say why ----------------------------------------------------------------


@pytest.fixture
def shard_server(tmp_path):
    """A real HTTP server over tmp_path/www: files as they are, 404 for a missing one,
    /status/N answers N; `hits` counts requests by path."""
    import functools
    import http.server
    import threading
    from collections import Counter

    root = tmp_path / "www"
    root.mkdir()
    hits = Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            if self.path.startswith("/status/"):
                self.send_error(int(self.path.split("/")[2]))
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, hits
    server.shutdown()
    server.server_close()


def not_a_tar(path):
    path.write_bytes(b"<html>this is not a tar file</html>" * 40)
    return str(path)


def test_a_source_that_yields_nothing_names_each_shard_and_cause(tmp_path, shard_server, caplog):
    """Shards that 404 over HTTP and files named .tar that are no tars: the error says
    which URL failed and why, on one line (launch.train keeps a worker error's last line)."""
    base, www, _ = shard_server
    not_a_tar(www / "html.tar")
    urls = [f"{base}/gone-000000.tar", f"{base}/html.tar", not_a_tar(tmp_path / "local.tar")]
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as err:
        first_epoch(stream(urls, "skip"))
    message = str(err.value)
    assert "\n" not in message and "source 'train'" in message
    assert f"{base}/gone-000000.tar: cannot open: HTTP 404" in message
    assert f"{base}/html.tar: not a tar archive" in message
    assert f"{tmp_path}/local.tar: not a tar archive" in message
    # the skip log named each of them too, with its cause
    assert f"shard '{base}/gone-000000.tar': cannot open: HTTP 404" in caplog.text
    assert f"shard '{tmp_path}/local.tar': not a tar archive" in caplog.text

    many = [not_a_tar(tmp_path / f"bad-{i}.tar") for i in range(7)]
    with pytest.raises(DataError, match=r"bad-\d\.tar: not a tar archive; .*; \+4 more failing shard\(s\)$"):
        first_epoch(stream(many, "skip"))


def test_the_error_from_a_loader_worker_keeps_its_causes_on_the_last_line(tmp_path, shard_server):
    from data_pipelines.stream import StreamLoader

    base, _, _ = shard_server
    loader = StreamLoader(stream([f"{base}/gone-000000.tar", not_a_tar(tmp_path / "x.tar")], "skip"), num_workers=1)
    with pytest.raises(Exception) as err:
        next(loader)
    last = [line for line in str(err.value).splitlines() if line.strip()][-1]  # as launch.train reads it
    assert f"{base}/gone-000000.tar: cannot open: HTTP 404" in last and "x.tar: not a tar archive" in last


@pytest.mark.parametrize("status, words", [(403, "HTTP 403 Forbidden"), (500, "HTTP 500 Internal Server Error")])
def test_http_status_is_named(shard_server, monkeypatch, status, words):
    """A 500 is retried (a transient failure) before it counts; a 403 is not."""
    from data_pipelines import stream as stream_module
    from data_pipelines.stream import iter_raw_samples

    monkeypatch.setattr(stream_module, "HTTP_RETRY_WAITS", (0, 0))
    base, _, hits = shard_server
    url = f"{base}/status/{status}"
    with pytest.raises(DataError, match=re.escape(f"shard '{url}': cannot open: {words}")):
        list(iter_raw_samples([url]))
    assert hits[f"/status/{status}"] == (3 if status == 500 else 1)


def test_permission_denied_and_missing_file_are_named(tmp_path, monkeypatch):
    import os

    from data_pipelines import stream as stream_module

    urls = write_numbered_shards(tmp_path, [3, 3, 3])
    os.chmod(urls[0], 0)
    if os.geteuid() == 0:  # root reads it anyway: make the OS's answer to anyone else
        opener = stream_module.open_url

        def denied(url):
            if url == urls[0]:
                raise PermissionError(13, "Permission denied", url)
            return opener(url)

        monkeypatch.setattr(stream_module, "open_url", denied)
    Path(urls[1]).unlink()
    with pytest.raises(DataError) as err:
        first_epoch(stream(urls[:2], "skip"))
    assert f"{urls[0]}: cannot open: permission denied" in str(err.value)
    assert f"{urls[1]}: cannot open: no such file" in str(err.value)


def test_a_failing_pipe_command_is_named(tmp_path):
    from data_pipelines.stream import iter_raw_samples

    url = f"pipe:cat {tmp_path}/absent.tar"
    with pytest.raises(DataError, match=re.escape(f"shard '{url}': its command exited with status 1")):
        list(iter_raw_samples([url]))


def test_an_eval_split_that_yields_nothing_is_an_error_even_under_skip(tmp_path, shard_server):
    from data_pipelines.stream import eval_batches

    base, _, _ = shard_server
    urls = [f"{base}/gone.tar", not_a_tar(tmp_path / "x.tar")]
    with pytest.raises(
        DataError,
        match=r"2 shard\(s\) yield no samples: .*gone\.tar: cannot open: "
        r"HTTP 404.*x\.tar: not a tar archive",
    ):
        list(
            eval_batches(
                ShardList(urls, None),
                decode=decode_strict,
                collate=collate_list,
                batch_size=2,
                rank=0,
                world_size=1,
                on_error="skip",
            )
        )


def test_a_thousand_bad_shards_do_not_flood_the_log(tmp_path, caplog, monkeypatch):
    from collections import Counter

    from data_pipelines import stream as stream_module
    from data_pipelines.stream import ErrorPolicy

    monkeypatch.setattr(stream_module, "_skips_seen", Counter())
    stats = {}
    policy = ErrorPolicy("skip", stats)
    with caplog.at_level(logging.WARNING):
        for i in range(1000):
            policy.shard_failed("bad_shards", f"/data/s-{i:06d}.tar", "not a tar archive")
    lines = caplog.text.splitlines()
    assert stats == {"bad_shards": 1000} and len(lines) == stream_module.LOG_EACH_SKIP + 2  # + 100th, 1000th
    assert "s-000000.tar" in lines[0] and "1000th" in lines[-1] and "s-000999.tar" in lines[-1]


def test_a_source_where_no_sample_decodes_is_an_error_not_a_hang(tmp_path):
    """Every shard reads but no sample decodes: under skip the stream must stop, naming
    the last bad sample, not skip forever."""
    import threading

    from data_pipelines.shards import write_shards

    write_shards(({"__key__": f"k{i}", "txt": b"no num"} for i in range(6)), tmp_path, maxcount=3)
    urls = [str(tmp_path / "shard-000000.tar"), str(tmp_path / "shard-000001.tar")]
    got = []

    def read():
        try:
            first_epoch(stream(urls, "skip"))
        except DataError as exc:
            got.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert not reader.is_alive(), "the stream skipped undecodable samples forever"
    assert re.search(
        r"no sample of source 'train' decodes for two epochs in a row; the last: "
        r"sample 'k\d' in shard .*missing key 'num'",
        got[0],
    )
