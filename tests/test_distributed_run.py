"""Real `accelerate launch` runs: 2 CPU ranks over gloo, real shards, real files read back."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_past_checkpoint

from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [
    str(Path(sys.executable).parent / "accelerate"),
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
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


def command(run_dir, digits_dir, *overrides):
    return ACCELERATE + [
        "--config",
        str(ROOT / "configs/autoregressive/made.yaml"),
        f"run.dir={run_dir}",
        f"data.train.urls={digits_dir}/train",
        f"data.val.urls={digits_dir}/val",
        f"data.test.urls={digits_dir}/test",
        "model.hidden=[128]",
        "trainer.progress_bar=false",
        "optim.warmup_steps=5",
        *overrides,
    ]


def run(cmd, env, timeout=300):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-20000:]
    return out


def train_records(run_dir):
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


def test_two_process_run_end_to_end(tmp_path, digits_dir, cpu_env):
    run_dir = tmp_path / "run"
    # rank 1 reads slowly in step 12: its wait shows in the max over ranks, not in rank 0's
    slow_reader = {**cpu_env, "TRIBUTARY_FAILPOINTS": "step.data@12/1=sleep", "TRIBUTARY_FAILPOINT_SLEEP": "2"}
    out = run(
        command(
            run_dir,
            digits_dir,
            "trainer.max_steps=60",
            "trainer.log_every=5",
            "trainer.eval_every=20",
            "trainer.checkpoint_every=20",
            "trainer.sample_every=60",
            "trainer.keep_last_k=2",
        ),
        slow_reader,
    )
    assert "test/nll=" in out.stdout

    records = train_records(run_dir)
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    assert records[-1]["train/loss"] < 0.8 * records[0]["train/loss"]
    assert all(
        0 <= r["train/data_wait_frac"] <= r["train/data_wait_frac_max"] <= 1 and r["train/samples_per_s"] > 0
        for r in records
    )
    slow = next(r for r in records if r["step"] == 15)
    assert slow["train/data_wait_frac_max"] > 0.5 > slow["train/data_wait_frac"] + 0.2, slow
    assert records[-1]["train/samples_seen"] == 60 * 32 * 2  # both ranks' batches counted

    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 60
    assert final["test/count"] == 360 and final["val/count"] == 180  # every sample once, over 2 ranks
    assert math.isfinite(final["test/nll"]) and 10 < final["test/nll"] < 45
    assert final["test/bits_per_dim"] == pytest.approx(final["test/nll"] / (64 * math.log(2)))

    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-40", "step-60"]
    meta = json.loads((run_dir / "checkpoints/step-60/COMPLETE.json").read_text())
    assert meta["world_size"] == 2
    assert {"rng-rank0.pt", "rng-rank1.pt", "data-rank0.json", "data-rank1.json"} <= set(meta["files"])
    data1 = json.loads((run_dir / "checkpoints/step-60/data-rank1.json").read_text())
    assert data1["rank"] == 1 and data1["batches"] == 60

    # TensorBoard: one writer (rank 0), and what it wrote reads back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tb_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert tb_loss == [(r["step"], pytest.approx(r["train/loss"], rel=1e-6)) for r in records]
    assert {"train/lr", "train/grad_norm", "train/samples_per_s", "train/data_wait_frac", "val/nll", "test/nll"} <= set(
        acc.Tags()["scalars"]
    )
    assert acc.Images("samples")[-1].step == 60

    # the best-by-validation export loads into a plain model and gives the reported test NLL
    from safetensors.torch import load_model

    from data_pipelines.stream import eval_batches, resolve_shards
    from models.autoregressive import MADEConfig, MADEWorkload

    wl = MADEWorkload(MADEConfig(hidden=[128]))
    net = wl.build_model()
    load_model(net, str(run_dir / "best/model.safetensors"))
    sums = {"nll_sum": 0.0, "count": 0.0}
    for x in eval_batches(
        resolve_shards(str(digits_dir / "test")),
        decode=wl.decode,
        collate=wl.collate,
        batch_size=100,
        rank=0,
        world_size=1,
    ):
        for k, v in wl.eval_sums(net, x).items():
            sums[k] += v.item()
    assert wl.eval_metrics(sums)["nll"] == pytest.approx(final["test/nll"], rel=1e-5)


@pytest.mark.drill  # make test: test_preemption's torchrun restart after a SIGKILL
def test_sigkill_then_same_command_resumes_exactly(tmp_path, digits_dir, cpu_env):
    args = (
        "trainer.max_steps=300",
        "trainer.log_every=1",
        "trainer.checkpoint_every=40",
        "trainer.eval_every=50",
        "data.num_workers=2",
        "data.shuffle_buffer=64",
    )
    reference = tmp_path / "uninterrupted"
    run(command(reference, digits_dir, *args), cpu_env)

    killed = tmp_path / "killed"
    cmd = command(killed, digits_dir, *args)
    kill_past_checkpoint(cmd, cpu_env, killed, checkpoint=80, past=97, timeout=240)
    steps_before = [r["step"] for r in train_records(killed)]
    assert steps_before[-1] > 80  # there is a tail past the checkpoint to discard

    out = run(cmd, cpu_env)
    assert "resumed from" in out.stdout + out.stderr

    ref, got = train_records(reference), train_records(killed)
    assert [r["step"] for r in got] == list(range(1, 301))
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in ref], key  # exact equality
    ref_final = json.loads((reference / "final_metrics.json").read_text())
    got_final = json.loads((killed / "final_metrics.json").read_text())
    assert got_final == ref_final
