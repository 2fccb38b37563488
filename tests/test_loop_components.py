"""The loop's components on their own, in-process: the schedule, the non-finite guard, the
throughput meter, the profiler context and the train step."""

from __future__ import annotations

import contextlib
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch

from trainer.guard import NonFiniteError, NonFiniteGuard
from trainer.meter import ThroughputMeter
from trainer.profiler import StepProfiler
from trainer.schedule import Schedule
from trainer.step import TrainStep


class OneRank:
    """The backend calls the components make, for one process (sums and maxima are the values)."""

    device, rank, world_size, is_main = torch.device("cpu"), 0, 1, True

    def reduce_sum(self, t):
        return t.clone()

    reduce_max = reduce_sum

    def no_sync(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def step(self, model, optimizer, clip, skip_nonfinite, measure):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf) if measure else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm


def test_schedule_answers_from_the_step_alone():
    s = Schedule(max_steps=25, log_every=10, eval_every=5, sample_every=20, checkpoint_every=10, has_val=True)
    assert [n for n in range(1, 26) if s.should_log(n)] == [10, 20, 25]
    assert [n for n in range(1, 26) if s.should_eval(n)] == [5, 10, 15, 20, 25]
    assert [n for n in range(1, 26) if s.should_sample(n)] == [20]
    assert [n for n in range(1, 26) if s.should_save(n)] == [10, 20]
    assert [n for n in range(1, 26) if s.should_measure_norm(n)] == [10, 20, 25]
    assert not Schedule(max_steps=25, log_every=10, eval_every=5, has_val=False).should_eval(5)
    assert not any(Schedule(max_steps=9, log_every=3).should_save(n) for n in range(1, 10))
    cfg = SimpleNamespace(
        max_steps=9, log_every=3, eval_every=0, sample_every=0, checkpoint_every=3, clip_grad_norm=1.0, nonfinite="halt"
    )
    assert all(Schedule.of(cfg, has_val=False).should_measure_norm(n) for n in range(1, 10))


def test_guard_halts_on_the_first_bad_loss_and_keeps_the_window_otherwise():
    said = []
    guard = NonFiniteGuard(
        OneRank(), policy="halt", max_skips=3, kept_checkpoint=lambda: "kept: step-4", say=said.append
    )
    state = SimpleNamespace(skipped_nonfinite=0)
    for step, loss in ((5, 1.0), (6, 2.0)):
        guard.observe(state, step, torch.tensor(loss), torch.tensor(0.5))
    guard.check(6)  # finite: nothing happens
    assert guard.window.sums().tolist() == [3.0, 1.0]
    guard.observe(state, 7, torch.tensor(float("nan")), torch.tensor(0.5))
    guard.observe(state, 8, torch.tensor(float("inf")), torch.tensor(0.5))
    with pytest.raises(
        NonFiniteError, match=r"non-finite loss at step 7 on rank\(s\) \[0\] \(caught at step 8.*kept: step-4"
    ):
        guard.check(8)
    guard.window.clear()
    guard.observe(state, 9, torch.tensor(1.0), torch.tensor(float("nan")))
    with pytest.raises(NonFiniteError, match="non-finite grad norm in steps 9 "):
        guard.check(9, reduced=guard.window.sums().tolist())
    assert said == [] and state.skipped_nonfinite == 0


def test_guard_skips_bad_steps_and_gives_up_after_a_run_of_them():
    said = []
    guard = NonFiniteGuard(OneRank(), policy="skip", max_skips=2, kept_checkpoint=lambda: "kept", say=said.append)
    state = SimpleNamespace(skipped_nonfinite=0)
    guard.observe(state, 1, torch.tensor(1.0), torch.tensor(float("inf")))
    guard.observe(state, 2, torch.tensor(2.0), torch.tensor(1.0))  # a good step ends the run of skips
    guard.observe(state, 3, torch.tensor(1.0), torch.tensor(float("nan")))
    assert state.skipped_nonfinite == 2 and guard.window.steps == [2] and len(said) == 2
    guard.check(3, [float("nan"), float("nan")])  # skip never halts on the sums
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row up to step 4"):
        guard.observe(state, 4, torch.tensor(1.0), torch.tensor(float("nan")))


def test_meter_counts_training_time_only():
    workload = SimpleNamespace(throughput_unit="samples", flops_per_sample=lambda batch, bs: 100.0 * bs)
    meter = ThroughputMeter(workload, samples_per_step=8, world_size=2, peak=1e-9, count_flops=True)
    meter.start_window(now=0.0)
    meter.count_flops_once(None, 4)
    meter.count_flops_once(None, 1)  # once
    assert meter.flops_per_sample == 400.0
    t0 = time.perf_counter()
    meter.start_window(now=t0)
    with meter.waiting_for_data():
        time.sleep(0.05)
    with meter.paused():  # an eval or a save: not training time
        time.sleep(0.2)
    meter.steps = 4
    out = meter.measure(time.perf_counter())
    assert 0.05 <= (time.perf_counter() - meter.start) < 0.2  # the pause moved the window's start
    assert out["train/samples_per_s"] > 4 * 8 / 0.2 and 0.5 < out["train/data_wait_frac"] <= 1
    assert out["perf/tflops_per_rank"] == pytest.approx(400.0 * out["train/samples_per_s"] / 2 / 1e12)

    said = []
    broken = SimpleNamespace(throughput_unit="samples", flops_per_sample=lambda b, bs: 1 / 0)
    meter = ThroughputMeter(broken, samples_per_step=1, world_size=1, peak=1.0, count_flops=True, say=said.append)
    meter.count_flops_once(None, 1)
    assert meter.flops_per_sample == 0.0 and "ZeroDivisionError" in said[0]
    meter.steps = 1
    assert "perf/mfu" not in meter.measure(meter.start + 1)


def profiled_steps(trace) -> list[str]:
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    return sorted(n for n in names if str(n).startswith("ProfilerStep#"))


def run_steps(profiler, steps, fail_at=None):
    with profiler:
        for step in steps:
            with profiler.label("forward"):
                torch.mm(torch.randn(8, 8), torch.randn(8, 8))
            if step == fail_at:
                raise RuntimeError("the step failed")
            profiler.step(step)


def test_profiler_records_the_asked_steps_after_a_warm_up(tmp_path):
    said = []
    p = StepProfiler(
        [3, 5], start_step=0, max_steps=10, device=torch.device("cpu"), out_dir=tmp_path, rank=1, say=said.append
    )
    assert p.warmup and p.action(2).name == "WARMUP" and p.action(1).name == "NONE"
    run_steps(p, range(1, 11))
    assert profiled_steps(tmp_path / "rank1.steps3-5.pt.trace.json") == [
        "ProfilerStep#3",
        "ProfilerStep#4",
        "ProfilerStep#5",
    ]
    assert (tmp_path / "rank1.steps3-5.txt").exists() and said == [
        f"profile of steps 3-5: {tmp_path}/rank1.steps3-5.pt.trace.json"
    ]


def test_profiler_starts_inside_its_range_on_resume_and_is_off_past_it(tmp_path):
    p = StepProfiler([3, 5], start_step=3, max_steps=10, device=torch.device("cpu"), out_dir=tmp_path, rank=0)
    assert (p.first, p.last, p.warmup) == (4, 5, False)
    run_steps(p, range(4, 11))
    assert profiled_steps(tmp_path / "rank0.steps4-5.pt.trace.json") == ["ProfilerStep#4", "ProfilerStep#5"]
    off = StepProfiler([3, 5], start_step=5, max_steps=10, device=torch.device("cpu"), out_dir=tmp_path / "off", rank=0)
    assert not off.active and off.label is contextlib.nullcontext
    run_steps(off, range(6, 8))
    assert not (tmp_path / "off").exists()


def test_profiler_stops_and_writes_when_the_loop_fails(tmp_path):
    p = StepProfiler([2, 6], start_step=0, max_steps=10, device=torch.device("cpu"), out_dir=tmp_path, rank=0)
    with pytest.raises(RuntimeError, match="the step failed"):
        run_steps(p, range(1, 11), fail_at=4)
    assert not torch.autograd.profiler._is_profiler_enabled  # no profiler left running
    assert profiled_steps(tmp_path / "rank0.steps2-3.pt.trace.json")  # what it had recorded


def test_train_step_accumulates_to_the_full_batch_step():
    """grad_accum_steps=2 on two halves takes the same optimizer step as one batch of both;
    the reported loss is their mean, and the LR schedule steps once."""
    torch.manual_seed(0)
    data = torch.randn(8, 4)

    class Work:
        def training_loss(self, model, batch):
            return model(batch).pow(2).mean()

    def one(accum):
        torch.manual_seed(1)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        meter = ThroughputMeter(SimpleNamespace(), samples_per_step=8, world_size=1, peak=None, count_flops=False)
        step = TrainStep(
            backend=OneRank(),
            workload=Work(),
            model=model,
            optimizer=opt,
            scheduler=sched,
            loader=iter(data.chunk(accum)),
            meter=meter,
            grad_accum_steps=accum,
            batch_size=8 // accum,
            clip_grad_norm=0.0,
            skip_nonfinite=False,
            fp16=False,
        )
        loss, norm = step(1, measure_norm=True)
        return loss, norm, model.weight.detach().clone(), opt.param_groups[0]["lr"]

    (l1, n1, w1, lr1), (l2, n2, w2, lr2) = one(1), one(2)
    assert torch.allclose(l1, l2) and torch.allclose(n1, n2) and torch.allclose(w1, w2)
    assert lr1 == lr2 == 0.05


@pytest.mark.parametrize("private_writer", [True, False])
def test_scalars_reach_tensorboard_with_or_without_the_private_writer(tmp_path, monkeypatch, private_writer):
    """The one-event fast path uses SummaryWriter._get_file_writer; a torch without it gets
    the public add_scalar, and TensorBoard reads the same values either way."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.metrics import MetricsLogger

    if not private_writer:  # a torch whose SummaryWriter names its file writer otherwise
        monkeypatch.setattr("trainer.metrics.PRIVATE_FILE_WRITER", "_get_event_file_writer")
    log = MetricsLogger(tmp_path, enabled=True, resume_step=0, total_steps=10, progress_bar=False)
    log.log(5, {"train/loss": 1.5, "train/lr": 0.01})
    log.log(10, {"train/loss": 0.5, "train/lr": 0.02})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(5, 1.5), (10, 0.5)]
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([0.01, 0.02])


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(tmp_path, capsys, monkeypatch):
    """Off a terminal (a SLURM log, a pipe) no carriage-return redraws: one plain line with
    the bar's figures every progress_every_s seconds, and one at the last step."""
    from trainer import metrics
    from trainer.metrics import MetricsLogger

    clock = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    log = MetricsLogger(
        tmp_path / "made",
        enabled=True,
        resume_step=0,
        total_steps=30,
        progress_bar=True,
        progress_every_s=10,
        terminal=False,
    )
    assert log.bar is None
    for step in range(1, 31):
        clock[0] += 1.0  # a step a second
        log.log(step, {"train/loss": 2.0 / step, "train/lr": 0.001}, bar_keys=("train/loss", "train/lr"))
        log.advance(step)
    log.close()
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert lines == [
        f"made: step {s}/30 ({100 * s // 30}%) loss={2.0 / s:.4g} lr=0.001 elapsed 0m{s:02d}s"
        + (f" eta 0m{30 - s:02d}s")
        for s in (10, 20, 30)
    ]
    # under trainer.max_time the sooner end wins: here 60 s, 15 of them spent before this launch
    timed = MetricsLogger(
        tmp_path / "timed",
        enabled=True,
        resume_step=0,
        total_steps=100000,
        progress_bar=True,
        progress_every_s=10,
        terminal=False,
        max_time=60,
        trained_s=15,
    )
    for step in range(1, 21):
        clock[0] += 1.0
        timed.advance(step)
    timed.close()
    assert capsys.readouterr().err.splitlines() == [
        f"timed: step {s}/100000 ({100 * (15 + s) // 60}% of trainer.max_time)  elapsed 0m{s:02d}s eta 0m{45 - s:02d}s"
        for s in (10, 20)
    ]
    on_tty = MetricsLogger(
        tmp_path / "tty", enabled=True, resume_step=0, total_steps=30, progress_bar=True, terminal=True
    )
    assert on_tty.bar is not None and on_tty.lines_every is None
    on_tty.close()


def test_tiny_sample_images_are_upscaled_for_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.metrics import MetricsLogger, upscaled

    images = torch.rand(4, 1, 8, 8)
    big = upscaled(images)
    assert big.shape == (4, 1, 64, 64) and torch.equal(big[:, :, ::8, ::8], images)  # nearest neighbour
    assert upscaled(torch.rand(2, 3, 128, 96)).shape == (2, 3, 128, 96)
    log = MetricsLogger(tmp_path, enabled=True, resume_step=0, total_steps=1, progress_bar=False)
    log.image("samples", images, 1)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    (event,) = acc.Images("samples")
    assert (event.width, event.height) == (4 * 65 + 1, 65 + 1)  # a row of four 64x64 tiles, 1 px padding


def test_no_samples_when_none_are_asked_for():
    """trainer.num_samples=0: the sample step asks the workload for nothing (an LM would
    refuse an empty batch of prompts at the end of the run)."""
    from types import SimpleNamespace

    from trainer.loop import Trainer

    class Refuses:
        def sample_images(self, *a):
            raise AssertionError("asked for images")

        sample_text = sample_images

    backend = SimpleNamespace(is_main=True, shards_params=False, unwrap=lambda m: m)
    fake = SimpleNamespace(cfg=SimpleNamespace(trainer=SimpleNamespace(num_samples=0, seed=0)), backend=backend)
    fake.workload, fake.model = Refuses(), torch.nn.Linear(1, 1)
    Trainer._log_samples(fake, step=1)  # returns without a call
    fake.cfg.trainer.num_samples = 1
    with pytest.raises(AssertionError, match="asked for images"):
        Trainer._log_samples(fake, step=1)
