"""Online action detection: the generated streams and their windows, decoding, both detectors'
shapes and losses, per-frame mAP against hand-computed and exact values, and a 2-rank OadTR
run that is SIGKILLed after a checkpoint and resumes with the unbroken run's losses. The
same for the GRU, and both recipes trained in full, OadTR against the GRU, are drills."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import kill_past_checkpoint
from torch import nn

from data_pipelines.sources import action_streams as A
from data_pipelines.stream import iter_raw_samples
from models.average_precision import average_precision
from models.oadtr.workload import GRUConfig, GRUWorkload, OadTRConfig, OadTRWorkload
from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train": (4, 150, 0), "val": (2, 100, 1), "test": (2, 100, 2)}  # streams, frames, seed
# the generated streams' shape, which a recipe states (the workloads know no data of their own)
DATA = {
    "feature_dim": A.FEATURE_DIM,
    "window": A.WINDOW,
    "action_classes": A.ACTION_CLASSES,
    "anticipation": A.ANTICIPATION,
}


@pytest.fixture(scope="session")
def streams_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("action-streams")
    A.build(out, counts=SMALL)
    return out


def raw_samples(folder: Path) -> list[dict]:
    return list(iter_raw_samples([str(p) for p in sorted(folder.glob("*.tar"))]))


def test_windows_cover_each_stream_once_and_labels_match_the_segments(streams_dir):
    wl = OadTRWorkload(OadTRConfig(**DATA))
    for split, (n_streams, length, seed) in SMALL.items():
        streams = A.split_streams(split, SMALL)
        seen = set()
        for sample in raw_samples(streams_dir / split):
            record = json.loads(sample["json"])
            s, t = record["stream"], record["frame"]
            assert (s, t) not in seen
            seen.add((s, t))
            features, labels = streams[s]
            got = wl.decode(sample)
            assert got["label"].item() == labels[t]
            assert got["future"].tolist() == [
                int(labels[u]) if u < length else -1 for u in range(t + 1, t + 1 + A.ANTICIPATION)
            ]
            history = np.zeros((A.WINDOW, A.FEATURE_DIM), np.float16)
            history[max(0, A.WINDOW - 1 - t) :] = features[max(0, t - A.WINDOW + 1) : t + 1]
            assert torch.equal(got["frames"], torch.from_numpy(history.astype(np.float32)))
        assert seen == {(s, t) for s in range(n_streams) for t in range(length)}, split

        for i, (_, labels) in enumerate(streams):
            segs = A.segments(np.random.default_rng([seed, i]), length)
            expected = np.zeros(length, np.int64)
            for c, start, end in segs:
                expected[start:end] = c
            assert np.array_equal(labels, expected)
            gaps = [b[1] - a[2] for a, b in zip(segs, segs[1:])] + [segs[0][1]]
            assert all(A.GAP[0] <= g <= A.GAP[1] for g in gaps)
            assert all(A.ACTION[0] <= end - start <= A.ACTION[1] for _, start, end in segs[:-1])
            assert all(1 <= c <= A.ACTION_CLASSES for c, _, _ in segs)


def test_only_the_onset_tells_paired_classes_apart():
    """What the docstring promises: later frames of classes 1 and 2 share one mean, their
    onsets do not."""
    p = A.prototypes()
    assert np.array_equal(p["motion"][1], p["motion"][2]) and not np.allclose(p["motion"][1], p["motion"][3])
    assert not np.allclose(p["signature"][1], p["signature"][2])
    assert A.ACTION[1] < A.WINDOW  # the onset is always in view


def test_build_is_deterministic_and_the_train_split_shuffled(streams_dir, tmp_path):
    again = A.build(tmp_path, counts=SMALL)
    for split in SMALL:
        first = json.loads((streams_dir / split / "manifest.json").read_text())
        assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in again[split]["shards"]]

    def order(split):
        return [(r["stream"], r["frame"]) for r in (json.loads(s["json"]) for s in raw_samples(streams_dir / split))]

    assert order("train") != sorted(order("train"))
    assert order("test") == sorted(order("test"))


def test_decode_names_the_problem(streams_dir):
    import io

    wl = GRUWorkload(GRUConfig(**DATA))
    good = raw_samples(streams_dir / "val")[0]
    with pytest.raises(KeyError, match=r"no 'npy' field; the sample has \['json'\]"):
        wl.decode({"__key__": "x", "json": good["json"]})
    with pytest.raises(KeyError, match="no 'json' field"):
        wl.decode({"__key__": "x", "npy": good["npy"]})
    short = io.BytesIO()
    np.save(short, np.zeros((A.WINDOW - 1, A.FEATURE_DIM), np.float16))
    with pytest.raises(ValueError, match=r"window has shape \(31, 16\), model.window x model.feature_dim is \(32, 16"):
        wl.decode({"npy": short.getvalue(), "json": good["json"]})
    record = json.loads(good["json"])
    for broken, message in [
        ({"future": record["future"]}, "json record has no 'label'"),
        ({**record, "future": [0] * 3}, "3 future labels, model.anticipation is 8"),
        ({**record, "label": 9}, r"label 9 is outside 0..8"),
        ({**record, "future": [-2] * 8}, "future labels .* are outside -1..8"),
    ]:
        with pytest.raises((KeyError, ValueError), match=message):
            wl.decode({"npy": good["npy"], "json": json.dumps(broken).encode()})


def test_both_models_shapes_and_sizes():
    x = torch.randn(5, A.WINDOW, A.FEATURE_DIM)
    oadtr, gru = OadTRWorkload(OadTRConfig(**DATA)).build_model(), GRUWorkload(GRUConfig(**DATA)).build_model()
    current, future = oadtr(x)
    assert current.shape == (5, A.ACTION_CLASSES + 1) and future.shape == (5, A.ANTICIPATION, A.ACTION_CLASSES + 1)
    current, future = gru(x)
    assert current.shape == (5, A.ACTION_CLASSES + 1) and future is None
    sizes = [sum(p.numel() for p in m.parameters()) for m in (oadtr, gru)]
    assert abs(sizes[0] - sizes[1]) < 0.02 * sizes[0], sizes  # the baseline is no smaller


def test_the_recipes_state_the_datas_shape_and_the_workloads_know_none():
    """feature_dim, window and action_classes have no defaults: a recipe without them fails
    naming the key; both recipes state the generated streams' values; the workload module
    imports no data generator."""
    import ast

    from launch.recipes import load_recipe
    from trainer.config import ConfigError

    for recipe in ("oadtr", "gru"):
        model = load_recipe(ROOT / f"configs/oadtr/{recipe}.yaml", ["run.dir=/tmp/x"]).model
        assert {k: getattr(model, k) for k in DATA} == DATA, recipe
    for key in ("feature_dim", "window", "action_classes"):
        with pytest.raises(ConfigError, match=f"config key 'model.{key}' is required but not set"):
            load_recipe(
                None,
                [
                    "run.dir=/tmp/x",
                    "model.name=oadtr",
                    *(f"model.{k}={v}" for k, v in DATA.items() if k not in (key, "anticipation")),
                ],
            )
        with pytest.raises(TypeError, match=key):
            GRUConfig(**{k: v for k, v in DATA.items() if k != key})
    assert OadTRConfig(**{k: v for k, v in DATA.items() if k != "anticipation"}).anticipation == 8  # l_d, the paper's
    tree = ast.parse((ROOT / "models/oadtr/workload.py").read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not [m for m in names if m and m.startswith("data_pipelines.sources")], names


class Fixed(nn.Module):
    """A stand-in detector that returns given class probabilities (as logits)."""

    def __init__(self, probs: torch.Tensor, future: torch.Tensor | None = None):
        super().__init__()
        self.logits, self.future = probs.log(), future

    def forward(self, frames):
        idx = frames[:, 0, 0].long()  # each window carries its row number
        return self.logits[idx], None if self.future is None else self.future[idx]


def batch_of(labels, future=None):
    n = len(labels)
    frames = torch.zeros(n, A.WINDOW, A.FEATURE_DIM)
    frames[:, 0, 0] = torch.arange(n)
    return {
        "frames": frames,
        "label": torch.tensor(labels),
        "future": torch.full((n, A.ANTICIPATION), -1) if future is None else future,
    }


def summed(wl, model, batches):
    """Eval sums over batches, as the trainer hands them on: scalars as floats, tensors as tensors."""
    total: dict = {}
    for b in batches:
        for k, v in wl.eval_sums(model, b).items():
            total[k] = total.get(k, 0) + v.double()
    return {k: v.item() if v.dim() == 0 else v for k, v in total.items()}


def test_frame_map_of_a_hand_made_case():
    """Two action classes. Class 1 ranks its frames TP, FP, TP, FP: precision 1 up to recall
    0.5, then 2/3; on COCO's 101 recalls that is (51 * 1 + 50 * 2/3) / 101. Class 2 ranks
    its only frame first: AP 1. Background scores never count."""
    wl = GRUWorkload(GRUConfig(**{**DATA, "action_classes": 2}))
    labels = [1, 0, 1, 0, 2]
    p1 = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.05])
    p2 = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.9])
    probs = torch.stack([1 - p1 - p2 + 0.1, p1, p2], 1).clamp(min=1e-3)
    probs = probs / probs.sum(1, keepdim=True)
    model = Fixed(probs)
    one = wl.eval_metrics(summed(wl, model, [batch_of(labels)]))
    ap1 = (51 + 50 * 2 / 3) / 101
    assert one["frame_map"] == pytest.approx((ap1 + 1) / 2, abs=1e-12)
    # additive: split into batches of 2, 2 and 1 frames gives the same sums
    parts = [batch_of(labels)]
    rows = [slice(0, 2), slice(2, 4), slice(4, 5)]
    parts = [{k: v[r] for k, v in parts[0].items()} for r in rows]
    split = wl.eval_metrics(summed(wl, model, parts))
    assert split["frame_map"] == one["frame_map"] and split["frames"] == one["frames"] == 5
    assert split["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert one["accuracy"] == pytest.approx(probs.argmax(1).eq(torch.tensor(labels)).float().mean().item())
    assert one["loss"] == pytest.approx(F.nll_loss(probs.log(), torch.tensor(labels)).item(), rel=1e-6)


def test_histogram_frame_map_matches_the_exact_ap():
    g = torch.Generator().manual_seed(0)
    k, n = 4, 600
    labels = torch.randint(0, k + 1, (n,), generator=g)
    logits = torch.randn(n, k + 1, generator=g) + 2.0 * F.one_hot(labels, k + 1)
    probs = logits.softmax(1)
    wl = GRUWorkload(GRUConfig(**{**DATA, "action_classes": k}))
    got = wl.eval_metrics(summed(wl, Fixed(probs), [batch_of(labels.tolist())]))["frame_map"]
    exact = np.mean([average_precision(probs[:, c], labels == c, int((labels == c).sum())) for c in range(1, k + 1)])
    assert 0.5 < exact < 0.95  # neither trivial nor hopeless
    assert got == pytest.approx(exact, abs=2e-3)


def test_losses():
    """OadTR: CE(current) + 0.5 CE(future frames that have a target); the GRU: CE(current)."""
    g = torch.Generator().manual_seed(0)
    n, c = 6, A.ACTION_CLASSES + 1
    probs = torch.rand(n, c, generator=g).softmax(1)
    future_logits = torch.randn(n, A.ANTICIPATION, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    future = torch.randint(0, c, (n, A.ANTICIPATION), generator=g)
    future[0, 3:] = -1  # past the stream's end
    batch = batch_of(labels.tolist(), future)
    current = F.cross_entropy(probs.log(), labels)
    valid = future != -1
    ahead = F.cross_entropy(future_logits[valid], future[valid])
    oadtr = OadTRWorkload(OadTRConfig(**DATA))
    assert oadtr.cfg.future_loss_weight == 0.5
    both = Fixed(probs, future_logits)
    assert oadtr.training_loss(both, batch).item() == pytest.approx((current + 0.5 * ahead).item(), rel=1e-6)
    gru = GRUWorkload(GRUConfig(**DATA))
    assert gru.training_loss(Fixed(probs), batch).item() == pytest.approx(current.item(), rel=1e-6)
    nothing_ahead = batch_of(labels.tolist())  # every future frame past the end: no nan
    assert oadtr.training_loss(both, nothing_ahead).item() == pytest.approx(current.item(), rel=1e-6)


def torchrun(recipe, run_dir, data, *overrides):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "launch.train",
        "--config",
        str(ROOT / f"configs/oadtr/{recipe}.yaml"),
        f"run.dir={run_dir}",
        f"data.train.urls={data}/train",
        f"data.val.urls={data}/val",
        f"data.test.urls={data}/test",
        "trainer.progress_bar=false",
        *overrides,
    ]


def run(cmd, env):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


TINY = {
    "oadtr": ["model.dim=16", "model.heads=2", "model.encoder_layers=1", "model.decoder_layers=1"],
    "gru": ["model.hidden=16"],
}


@pytest.mark.parametrize("recipe", ["oadtr", pytest.param("gru", marks=pytest.mark.drill)])  # CI time
def test_killed_after_a_checkpoint_resumes_with_the_same_losses(tmp_path, streams_dir, cpu_env, recipe):
    tiny = [
        *TINY[recipe],
        "model.histogram_bins=100",
        "data.batch_size=8",
        "data.eval_batch_size=100",
        "data.shuffle_buffer=50",
        "trainer.max_steps=12",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=4",
        "optim.warmup_steps=2",
    ]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    with open(tmp_path / "unbroken.log", "w") as log:  # the unbroken run goes alongside: CI time
        unbroken = subprocess.Popen(
            torchrun(recipe, ref, streams_dir, *tiny), cwd=ROOT, env=cpu_env, stdout=log, stderr=subprocess.STDOUT
        )
        kill_past_checkpoint(torchrun(recipe, killed, streams_dir, *tiny), cpu_env, killed, checkpoint=4, past=6)
        assert "resumed from" in run(torchrun(recipe, killed, streams_dir, *tiny), cpu_env)
        assert unbroken.wait(timeout=300) == 0, (tmp_path / "unbroken.log").read_text()[-3000:]

    def series(d):
        return [(r["step"], r["train/loss"]) for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]

    assert len(series(ref)) == 12 and series(killed) == series(ref)
    final = json.loads((ref / "final_metrics.json").read_text())
    assert final == json.loads((killed / "final_metrics.json").read_text())
    assert 0 <= final["frame_map"] <= 1 and final["frame_map"] == final["test/frame_map"]


@pytest.mark.drill
@pytest.mark.timeout(1800)
@pytest.mark.xfail(
    strict=True,
    reason="measured 2026-11-30: test frame_map GRU 0.9775 > OadTR 0.9612 on "
    "these streams (issue 8 stays open); strict: a win turns this red",
)
def test_oadtr_beats_the_gru_baseline(tmp_path, cpu_env):
    """Both recipes as they are, on the full generated streams, 2 ranks each. The issue's
    criterion; it does not hold on this data yet (README, "Online action detection")."""
    data = tmp_path / "action-streams"
    A.build(data)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "launch.train",
    ]
    finals = {}
    for recipe in ("oadtr", "gru"):
        out = subprocess.run(
            [
                *launch,
                "--config",
                str(ROOT / f"configs/oadtr/{recipe}.yaml"),
                f"run.dir={tmp_path / recipe}",
                f"data.train.urls={data}/train",
                f"data.val.urls={data}/val",
                f"data.test.urls={data}/test",
                "trainer.progress_bar=false",
            ],
            cwd=ROOT,
            env=cpu_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        finals[recipe] = json.loads((tmp_path / recipe / "final_metrics.json").read_text())
    assert all(math.isfinite(f["frame_map"]) for f in finals.values())
    assert finals["oadtr"]["frame_map"] > finals["gru"]["frame_map"], finals
