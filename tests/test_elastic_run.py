"""Exactly-once delivery through the real trainer when a run resumes on another layout.

Each case trains a few epochs' worth in two legs: the first stops mid-epoch with a
checkpoint, the second resumes it with the same layout, or with other ranks or loader
workers (global batch kept).
Every consumed sample's name goes to the key ledger; per finished epoch, each of the 1,257
training digits must appear exactly once.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SAMPLES = 1257


def leg(run_dir, digits_dir, env, ranks, *overrides):
    launcher = (
        [sys.executable, "-m", "launch.train"]
        if ranks == 1
        else [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(ranks),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
            "-m",
            "launch.train",
        ]
    )
    cmd = launcher + [
        "--config",
        str(ROOT / "configs/autoregressive/made.yaml"),
        f"run.dir={run_dir}",
        f"data.train.urls={digits_dir}/train",
        f"data.val.urls={digits_dir}/val",
        f"data.test.urls={digits_dir}/test",
        "model.hidden=[32]",
        "trainer.progress_bar=false",
        "optim.warmup_steps=2",
        "trainer.log_every=10",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=50",
        "data.key_ledger=true",
        "data.shuffle_buffer=64",
        *overrides,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    return out.stdout + out.stderr


def deliveries(run_dir):
    counts = {}
    for path in (run_dir / "ledger").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            for _source, epoch, _shard, _offset, key in json.loads(line)["keys"]:
                counts.setdefault(epoch, Counter())[key] += 1
    return counts


def finished_epochs(run_dir, step):
    """Epochs below every reader's current epoch, from the final checkpoint's positions."""
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    current = []
    for f in ckpt.glob("data-rank*.json"):
        for reader in json.loads(f.read_text())["readers"].values():
            src = reader["sources"][0]
            pending = [it[0] for it in src["queue"]] + [n[0] for n in src["buffer"]]
            current.append(min(pending) if pending else src["next_epoch"])
    return range(min(current))


@pytest.mark.parametrize(
    "first, second, mode",
    [
        # all drills (CI time); make test checks the stream's elastic resume in-process
        # (tests/test_stream.py) and the same layout's exact resume in the launch tests
        pytest.param((2, 2, 16), (2, 2, 16), "exact", marks=pytest.mark.drill),  # same layout
        pytest.param((2, 1, 16), (1, 1, 32), "elastic", marks=pytest.mark.drill),  # 2 ranks -> 1 rank
        pytest.param((1, 1, 32), (2, 1, 16), "elastic", marks=pytest.mark.drill),  # 1 rank -> 2 ranks
        pytest.param((2, 1, 16), (2, 2, 16), "elastic", marks=pytest.mark.drill),  # 1 -> 2 loader workers
    ],
    ids=["same_layout", "2to1_ranks", "1to2_ranks", "1to2_workers"],
)
def test_resume_delivers_each_sample_once(tmp_path, digits_dir, cpu_env, first, second, mode):
    run_dir = tmp_path / "run"
    (r1, w1, b1), (r2, w2, b2) = first, second
    leg(run_dir, digits_dir, cpu_env, r1, "trainer.max_steps=50", f"data.num_workers={w1}", f"data.batch_size={b1}")
    out = leg(
        run_dir, digits_dir, cpu_env, r2, "trainer.max_steps=200", f"data.num_workers={w2}", f"data.batch_size={b2}"
    )
    assert f"(step 50, {mode}" in out

    counts = deliveries(run_dir)
    delivered = sum(sum(c.values()) for c in counts.values())
    assert delivered == 200 * 32  # every consumed sample is in the ledger
    done = finished_epochs(run_dir, 200)
    assert len(done) >= 3  # 50 steps = 1.27 epochs in the first leg; 5.1 epochs in all
    for epoch, counter in counts.items():
        assert max(counter.values()) == 1, f"epoch {epoch}: a sample came twice"
        if epoch in done:
            assert len(counter) == TRAIN_SAMPLES, f"epoch {epoch}: {TRAIN_SAMPLES - len(counter)} lost"
