"""Speed instruments: FLOPs counting, MFU and throughput in TensorBoard, the profiler switch,
the optimizer implementations, and the overhead benchmark's own arithmetic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_counted_flops_follow_autograd_for_made():
    """MADE D=64, H=32: forward 2(DH + HD), weight grads the same, input grads only for the
    second layer (the pixels need none): 10 D H per sample."""
    from launch.recipes import load_recipe
    from models.flops import train_flops_per_sample
    from models.registry import build_workload

    cfg = load_recipe(ROOT / "configs/autoregressive/made.yaml", ["model.hidden=[32]"])
    workload = build_workload(cfg.model)
    batch = torch.zeros(8, 64)
    assert train_flops_per_sample(workload, batch, 8) == 10 * 64 * 32


@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_counted_lm_flops_match_palm_formula(objective):
    """The counter on the meta device agrees with 6 N + 12 L d T per token (PaLM), N the
    matmul weights, within the softmax/norm/bias work neither counts the same way."""
    from launch.recipes import load_recipe
    from models.flops import lm_flops_per_token, train_flops_per_sample
    from models.registry import build_workload

    seq = 256
    cfg = load_recipe(
        ROOT / "configs/lm/causal_1k.yaml",
        [f"model.seq_len={seq}", f"model.objective={objective}", "model.dim=64", "model.depth=2", "model.heads=2"],
    )
    workload = build_workload(cfg.model)
    model = workload.build_model()
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    batch = {"tokens": torch.randint(0, 256, (2, seq + 1)), "seed": torch.zeros(2, dtype=torch.long)}
    counted = train_flops_per_sample(workload, batch, 2)
    expected = lm_flops_per_token(n, cfg.model.depth, cfg.model.dim, seq) * seq
    assert counted == pytest.approx(expected, rel=0.05)


def test_nade_states_its_formula():
    from launch.recipes import load_recipe
    from models.registry import build_workload

    cfg = load_recipe(ROOT / "configs/autoregressive/nade.yaml")
    w = build_workload(cfg.model)
    assert w.flops_per_sample(None, 32) == 12 * w.dims * cfg.model.hidden


def test_gpu_peaks_by_name_and_precision():
    from trainer.meter import gpu_peak_tflops

    assert gpu_peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert gpu_peak_tflops("NVIDIA GeForce RTX 3090", "bf16") is None


def test_cpu_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    from trainer import meter as flops

    cache = tmp_path / "cpu_peak.json"
    first = flops.cpu_peak_tflops(cache, probe_s=0.05)
    assert first > 0 and json.loads(cache.read_text())
    monkeypatch.setattr(flops.torch, "mm", lambda *a: (_ for _ in ()).throw(AssertionError("probed again")))
    assert flops.cpu_peak_tflops(cache) == first


def test_mfu_throughput_and_profile_of_a_real_run(tmp_path, digits_dir, cpu_env):
    """One run: perf/* scalars in metrics.jsonl and in the TensorBoard event file, equal to
    the counted FLOPs x samples/s over the configured peak; a trace of steps 5-8 per rank."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
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
        "model.hidden=[32]",
        "trainer.progress_bar=false",
        "trainer.max_steps=20",
        "trainer.log_every=5",
        "optim.warmup_steps=2",
        "trainer.eval_every=0",
        "trainer.peak_tflops=0.002",
        "trainer.profile_steps=[5,8]",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=cpu_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MFU against 0.002 TFLOP/s per rank (trainer.peak_tflops)" in out.stdout
    flops = 10 * 64 * 32  # test_counted_flops_follow_autograd_for_made
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/samples_per_s" in r]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert r["perf/tflops_per_rank"] == pytest.approx(flops * r["train/samples_per_s"] / 1e12, rel=1e-9)
        assert r["perf/mfu"] == pytest.approx(r["perf/tflops_per_rank"] / 0.002, rel=1e-9)
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("perf/mfu")] == [5, 10, 15, 20]
    assert acc.Scalars("perf/mfu")[-1].value == pytest.approx(records[-1]["perf/mfu"], rel=1e-6)

    trace = json.loads((run_dir / "profile" / "rank0.steps5-8.pt.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"data", "forward", "backward", "optimizer"} <= names
    assert sum(1 for n in names if str(n).startswith("ProfilerStep#")) == 4
    assert "aten::addmm" in (run_dir / "profile" / "rank0.steps5-8.txt").read_text()


def test_lm_throughput_is_in_tokens():
    """perf/tokens_per_s = samples/s x seq_len; TFLOP/s per rank divides by the ranks."""
    from launch.recipes import load_recipe
    from models.registry import build_workload
    from trainer.meter import ThroughputMeter

    cfg = load_recipe(ROOT / "configs/lm/causal_1k.yaml")
    meter = ThroughputMeter(build_workload(cfg.model), samples_per_step=10, world_size=2, peak=100.0, count_flops=False)
    meter.flops_per_sample = 2e9
    meter.start_window(now=0.0)
    meter.steps, meter.data_wait = 5, 0.25
    out = meter.measure(now=1.0)
    assert out == {
        "train/samples_per_s": 50.0,
        "train/data_wait_frac": 0.25,
        "perf/tokens_per_s": 50.0 * 1024,
        "perf/tflops_per_rank": 2e9 * 50 / 2 / 1e12,
        "perf/mfu": 2e9 * 50 / 2 / 1e12 / 100.0,
    }


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_optimizer_implementations_take_the_same_steps(impl):
    from trainer.config import OptimConfig
    from trainer.loop import build_optimizer

    def run(which):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
        opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, impl=which))
        for _ in range(5):
            model(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()], opt

    ref, _ = run("for-loop")
    got, opt = run(impl)
    assert opt.param_groups[0][impl] is True
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_picks_the_fused_kernel_where_torch_has_one():
    from trainer.config import OptimConfig
    from trainer.loop import build_optimizer, resolve_impl

    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, OptimConfig(impl="auto"))
    assert opt.defaults["fused"] is True and opt.defaults["foreach"] is None  # CPU has the fused kernel
    assert resolve_impl("auto", [torch.zeros(2, dtype=torch.int64)]) == "auto"  # no fused kernel: torch decides
    assert resolve_impl("for-loop", list(model.parameters())) == "for-loop"  # a chosen one is kept


def test_windows_hold_one_log_step_each():
    from benchmarks.overhead import windows

    assert windows([1.0] * 5 + [2.0] * 20 + [9.0] * 3, warmup=5, width=10) == [2.0, 2.0]


@pytest.mark.drill  # compiling takes tens of seconds on a CPU
def test_trainer_compile_takes_the_same_steps(tmp_path, digits_dir, cpu_env):
    def losses(name, *more):
        run_dir = tmp_path / name
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
            "model.hidden=[32]",
            "trainer.progress_bar=false",
            "trainer.max_steps=6",
            "trainer.log_every=1",
            "optim.warmup_steps=2",
            "trainer.eval_every=0",
            *more,
        ]
        out = subprocess.run(cmd, cwd=ROOT, env=cpu_env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return [r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]

    eager, compiled = losses("eager"), losses("compiled", "trainer.compile=true")
    assert len(eager) == 6 and compiled == pytest.approx(eager, rel=1e-4)
