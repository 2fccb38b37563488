"""`trainer.profile_steps=[first, last]`: a torch.profiler trace of those steps on every rank.

torch.profiler's own schedule runs it: one warm-up step before `first` when the session has
that step (a resumed run may start inside the range), then the recorded steps. As a context
it is exception-safe: however the loop ends, the profiler stops and writes what it recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile, record_function


class StepProfiler:
    def __init__(
        self,
        steps: list[int],
        *,
        start_step: int,
        max_steps: int,
        device: torch.device,
        out_dir: Path,
        rank: int,
        say: Callable[[str], None] = print,
    ):
        first, last = (max(steps[0], start_step + 1), min(steps[1], max_steps)) if steps else (1, 0)
        self.first, self.last, self.device = first, last, device
        self.out_dir, self.rank, self.say = out_dir, rank, say
        self.active = first <= last
        self.warmup = self.active and first - 1 > start_step
        self.start_step = start_step
        self.recorded: int | None = None  # the last step the profiler saw
        self._prof: profile | None = None
        # regions of each step ("data", "forward", ...): free when nothing profiles this session
        self.label = record_function if self.active else contextlib.nullcontext

    def action(self, step: int) -> ProfilerAction:
        """What the profiler does during `step` (1-based, the step about to run)."""
        if self.warmup and step == self.first - 1:
            return ProfilerAction.WARMUP
        if self.first <= step < self.last:
            return ProfilerAction.RECORD
        return ProfilerAction.RECORD_AND_SAVE if step == self.last else ProfilerAction.NONE

    def __enter__(self) -> StepProfiler:
        if self.active:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            prof = profile(
                activities=activities,
                schedule=self.action,
                on_trace_ready=self._write,
                record_shapes=True,
                profile_memory=True,
            )
            # count in the run's steps, so that the trace's ProfilerStep#N is step N (the
            # profiler's counter and the schedule's first answer, as its __init__ set them for 0;
            # tests/test_loop_components.py checks the labels against a torch upgrade)
            prof.step_num = self.start_step + 1
            prof.current_action = self.action(prof.step_num)
            if hasattr(prof, "_prev_schedule_action"):
                prof._prev_schedule_action = prof.current_action
            self._prof = prof.__enter__()
        return self

    def step(self, step: int) -> None:
        """After each optimizer step."""
        if self._prof is not None and step <= self.last:
            self.recorded = step
            self._prof.step()

    def __exit__(self, *exc) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.__exit__(*exc)  # stops; a trace cut short by an error or a stop is written too

    def _write(self, prof: profile) -> None:
        """The trace (Chrome format, as TensorBoard's profiler plugin names it) and a table.
        A trace that cannot be written is a warning: it never replaces the run's own error."""
        last = self.recorded if self.recorded is not None else self.first
        name = f"rank{self.rank}.steps{self.first}-{last}"
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(self.out_dir / f"{name}.pt.trace.json"))
            by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            (self.out_dir / f"{name}.txt").write_text(prof.key_averages().table(sort_by=by, row_limit=30))
        except OSError as exc:
            self.say(f"warning: the profile of steps {self.first}-{last} was not written ({exc})")
            return
        self.say(f"profile of steps {self.first}-{last}: {self.out_dir}/{name}.pt.trace.json")
