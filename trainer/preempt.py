"""Stopping early without losing a step: preemption signals and the job's time limit.

A signal reaches ranks at different moments (or only some of them), so no rank acts on it
alone. Each rank notes what it saw; at every step boundary the ranks agree (one MAX
all-reduce of a small CPU integer over gloo, which never waits on the accelerator's stream)
and all stop after the same step, save, and leave.

  SIGUSR1        SLURM's warning (`#SBATCH --signal=B:USR1@GRACE`): save, then requeue the job
  time limit     the job's end time (TRIBUTARY_JOB_END, epoch seconds; the sbatch templates
                 set it) minus trainer.end_margin_s: save, then requeue
  SIGTERM        scancel, SLURM's own preemption, a kill: save and exit; SLURM decides
                 whether the job comes back (a requeue here would undo an scancel)

The process exits with EXIT_STOPPED (75, EX_TEMPFAIL: "try again") so a stopped run is
told apart from a finished (0) or a failed one.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_STOPPED = 75
NONE, TERM, REQUEUE_SIGNAL, REQUEUE_DEADLINE = 0, 1, 2, 3  # MAX across ranks wins
REASONS = {TERM: "SIGTERM", REQUEUE_SIGNAL: "SIGUSR1", REQUEUE_DEADLINE: "the job's time limit"}


def job_end_time() -> float | None:
    """The SLURM job's end time in epoch seconds, from TRIBUTARY_JOB_END; None if unknown."""
    value = os.environ.get("TRIBUTARY_JOB_END", "").strip()
    try:
        return float(value) if value else None
    except ValueError:
        log.warning("TRIBUTARY_JOB_END=%r is not epoch seconds; no time-limit stop", value)
        return None


class StopAgreement:
    """Per-rank signal handlers plus the per-step vote. `poll()` returns the agreed reason."""

    def __init__(self, *, check_every: int = 1, end_margin_s: float = 0.0):
        self.check_every = max(1, check_every)
        self.seen = NONE
        end = job_end_time()
        self.deadline = end - end_margin_s if end is not None else None
        self.group = None
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.world > 1:
            # the vote is a CPU collective: with NCCL as the default group, a gloo side group
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.vote = torch.zeros(1, dtype=torch.int32)
        self._previous = {}
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum, frame) -> None:
        reason = REQUEUE_SIGNAL if signum == signal.SIGUSR1 else TERM
        self.seen = max(self.seen, reason)

    def poll(self, step: int) -> int:
        """Called by every rank after each optimizer step; the same answer on all of them."""
        if step % self.check_every:
            return NONE
        local = self.seen
        if self.deadline is not None and time.time() >= self.deadline:
            local = max(local, REQUEUE_DEADLINE)
        if self.world == 1:
            return local
        self.vote[0] = local
        dist.all_reduce(self.vote, op=dist.ReduceOp.MAX, group=self.group)
        return int(self.vote[0])

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def requeue_slurm_job(reason: int) -> str | None:
    """`scontrol requeue` this SLURM job when the stop asks for it; what was done, in words."""
    job = os.environ.get("SLURM_JOB_ID")
    if reason not in (REQUEUE_SIGNAL, REQUEUE_DEADLINE) or not job:
        return None
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"SLURM job {job} not requeued: scontrol is not on PATH"
    out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return f"SLURM job {job} not requeued: scontrol said {out.stderr.strip() or out.returncode}"
    return f"SLURM job {job} requeued; it resumes from this checkpoint"
