"""Single-process runs of the real entry point: accumulation, bf16, time limit, export."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def train(run_dir, digits_dir, env, *overrides):
    cmd = [
        sys.executable,
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/autoregressive/made.yaml"),
        f"run.dir={run_dir}",
        f"data.train.urls={digits_dir}/train",
        f"data.val.urls={digits_dir}/val",
        f"data.test.urls={digits_dir}/test",
        "model.hidden=[64]",
        "trainer.progress_bar=false",
        "optim.warmup_steps=2",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.sample_every=0",
        *overrides,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-5000:]
    return out


def losses(run_dir):
    return [r["train/loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


def test_grad_accumulation_matches_one_big_batch(tmp_path, digits_dir, cpu_env):
    """2 micro-batches of 16 take the same steps as one batch of 32 (same samples, in order)."""
    train(tmp_path / "big", digits_dir, cpu_env, "trainer.max_steps=15", "data.batch_size=32")
    train(
        tmp_path / "acc",
        digits_dir,
        cpu_env,
        "trainer.max_steps=15",
        "data.batch_size=16",
        "trainer.grad_accum_steps=2",
    )
    big, acc = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert len(big) == len(acc) == 15
    assert acc == pytest.approx(big, rel=1e-4)
    assert acc[-1] < acc[0]


def test_bf16_autocast_trains(tmp_path, digits_dir, cpu_env):
    train(tmp_path / "bf16", digits_dir, cpu_env, "trainer.max_steps=20", "trainer.mixed_precision=bf16")
    got = losses(tmp_path / "bf16")
    assert len(got) == 20 and all(math.isfinite(v) for v in got) and got[-1] < got[0]


def test_max_time_stops_saves_and_reports(tmp_path, digits_dir, cpu_env):
    """trainer.max_time is a reason in the stop vote, like a signal: it acts between log
    steps (log_every is far beyond the steps a 3 s run makes), saves and then finishes as at
    max_steps: final eval, test metrics, exit 0."""
    run_dir = tmp_path / "timed"
    out = train(
        run_dir, digits_dir, cpu_env, "trainer.max_steps=1000000", "trainer.max_time=3", "trainer.log_every=100000"
    )
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert 1 <= final["step"] < 100000
    assert f"trainer.max_time=3.0s reached at step {final['step']}" in out.stdout
    assert (run_dir / f"checkpoints/step-{final['step']}/COMPLETE.json").exists()
    assert math.isfinite(final["test/nll"])
    # run again: the time is spent, so it resumes, trains no step and reports the same
    logged = (run_dir / "metrics.jsonl").read_text()
    again = train(
        run_dir, digits_dir, cpu_env, "trainer.max_steps=1000000", "trainer.max_time=3", "trainer.log_every=100000"
    )
    step = final["step"]
    assert f"resumed from {run_dir / f'checkpoints/step-{step}'} (step {step}, exact)" in again.stdout
    assert json.loads((run_dir / "final_metrics.json").read_text()) == final
    assert max(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")) == step
    assert (run_dir / "metrics.jsonl").read_text() == logged


def test_export_loads_into_a_plain_model(tmp_path, digits_dir, cpu_env):
    run_dir = tmp_path / "run"
    train(run_dir, digits_dir, cpu_env, "trainer.max_steps=10", "trainer.eval_every=5")
    out = subprocess.run(
        [sys.executable, "-m", "launch.export", str(run_dir), "--which", "latest"],
        cwd=ROOT,
        env=cpu_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    from safetensors.torch import load_file

    from trainer.sharded import model_tensors, read_metadata, read_model_tensors

    exported = load_file(run_dir / "export/model.safetensors")
    state = run_dir / "checkpoints/step-10/state"
    in_ckpt = read_model_tensors(state, list(model_tensors(read_metadata(state))))
    assert exported.keys() == in_ckpt.keys()
    assert all((exported[k] == in_ckpt[k]).all() for k in exported)
    meta = json.loads((run_dir / "best/meta.json").read_text())
    assert meta["step"] in (5, 10)
