"""Stopping early without losing a step: signals, the job's time limit and trainer.max_time.

A signal reaches ranks at different moments (or only some of them), so no rank acts on it
alone. Each rank notes what it saw; at a step boundary the ranks agree (one MAX
all-reduce of two CPU integers over gloo, which never waits on the accelerator's stream)
and all stop after the same step, save, and leave. The vote is held about once a second
(StopAgreement explains how the ranks agree on when).

  SIGUSR1        SLURM's warning (`#SBATCH --signal=B:USR1@GRACE`): save, then requeue the job
  time limit     the job's end time (TRIBUTARY_JOB_END, epoch seconds, which the sbatch
                 templates set; else squeue's, asked once by rank 0) minus
                 trainer.end_margin_s: save, then requeue
  SIGTERM        scancel, SLURM's own preemption, a kill: save and exit; SLURM decides
                 whether the job comes back (a requeue here would undo an scancel)
  SIGINT         Ctrl-C: save and exit like SIGTERM. A second SIGINT exits at once (130),
                 leaving at most a `.step-N.partial` folder, which no resume chooses
  max_time       trainer.max_time seconds of training: save, then finish as at max_steps
                 (final eval, test metrics, report)

After a signal or the time limit the process exits with EXIT_STOPPED (75, EX_TEMPFAIL:
"try again") so a stopped run is told apart from a finished (0) or a failed one.
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
EXIT_INTERRUPTED = 130  # a second Ctrl-C: out at once, nothing saved (128 + SIGINT, as shells say)
# MAX across ranks wins: a signal outranks max_time (stop, not finish); a requeue outranks a plain stop
NONE, MAX_TIME, INTERRUPT, TERM, REQUEUE_SIGNAL, REQUEUE_DEADLINE = 0, 1, 2, 3, 4, 5
REASONS = {
    MAX_TIME: "trainer.max_time",
    INTERRUPT: "SIGINT",
    TERM: "SIGTERM",
    REQUEUE_SIGNAL: "SIGUSR1",
    REQUEUE_DEADLINE: "the job's time limit",
}
_SIGNAL_REASONS = {signal.SIGUSR1: REQUEUE_SIGNAL, signal.SIGTERM: TERM, signal.SIGINT: INTERRUPT}


def slurm_job_name() -> str | None:
    """This job's id for scontrol and squeue, None outside SLURM. An array task's is
    ARRAYID_TASKID: one task's own SLURM_JOB_ID equals SLURM_ARRAY_JOB_ID, and to scontrol
    and squeue that number means the whole array (`scontrol requeue` would rerun every
    task, finished ones too)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def job_end_time(ask_slurm: bool = False) -> float | None:
    """The job's end time in epoch seconds: TRIBUTARY_JOB_END (the sbatch templates set
    it), else, with `ask_slurm` inside a SLURM job, squeue's answer; None if unknown."""
    value = os.environ.get("TRIBUTARY_JOB_END", "").strip()
    if value:
        try:
            return float(value)
        except ValueError:
            log.warning("TRIBUTARY_JOB_END=%r is not epoch seconds; no time-limit stop", value)
            return None
    job, squeue = slurm_job_name(), shutil.which("squeue")
    if not (ask_slurm and job and squeue):
        return None
    try:
        out = subprocess.run(
            [squeue, "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        return time.mktime(time.strptime(out, "%Y-%m-%dT%H:%M:%S"))  # local time, as squeue prints
    except (OSError, subprocess.SubprocessError, ValueError):
        return None  # no limit ("UNLIMITED"/"N/A") or no answer


def _kill_children() -> None:
    """SIGKILL this process's multiprocessing children (the data-loader workers, which
    ignore SIGINT) before an os._exit: left alone they outlive it until their watchdog
    notices, holding its stdout open (a `| tee` or a caller reading the pipe waits on them)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        try:
            child.kill()
        except (OSError, ValueError):  # already gone, or closed
            pass


class StopAgreement:
    """Per-rank signal handlers plus the vote. `poll()` returns the agreed reason.

    A vote is a collective (hundreds of microseconds over gloo on a busy CPU, a real share of
    a small model's step), so with `check_every=0` the ranks vote about once per
    `target_s` seconds: each vote also carries rank 0's proposal for how many steps to the
    next one, measured from its step rate, and MAX makes every rank take it. A stop then
    waits at most about `target_s` plus one step. `check_every=N` votes every N steps.
    """

    def __init__(
        self,
        *,
        check_every: int = 0,
        end_margin_s: float = 0.0,
        target_s: float = 1.0,
        max_time: float = 0.0,
        elapsed=None,
    ):
        self.check_every, self.target_s = check_every, target_s
        # trainer.max_time against `elapsed()`, the run's training seconds so far (0 = no limit)
        self.max_time, self.elapsed = max_time, elapsed
        self.seen = NONE
        self.group = None
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        # the vote is a MAX, so rank 0 knowing the deadline is enough (and only it asks SLURM)
        end = job_end_time(ask_slurm=self.rank == 0)
        self.deadline = end - end_margin_s if end is not None else None
        if self.world > 1:
            # the vote is a CPU collective: with NCCL as the default group, a gloo side group
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._interrupted = False
        self.vote = torch.zeros(2, dtype=torch.int64)  # [reason, steps to the next vote]
        self.next_vote = 1
        self.votes = 0
        self._since = (0, time.perf_counter())  # (step, time) of the last vote
        self._previous = {}
        for signum in _SIGNAL_REASONS:
            self._previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum, frame) -> None:
        reason = _SIGNAL_REASONS[signum]
        if reason == INTERRUPT:
            if self._interrupted:
                # the second Ctrl-C: a save in flight stays a .partial folder, never chosen
                os.write(2, b"second SIGINT: exiting now without saving\n")
                _kill_children()
                os._exit(EXIT_INTERRUPTED)
            self._interrupted = True
            if self.rank == 0:
                os.write(
                    2,
                    b"SIGINT: stopping after the step all ranks agree on, then saving "
                    b"(Ctrl-C again to exit at once without saving)\n",
                )
        self.seen = max(self.seen, reason)

    def poll(self, step: int) -> int:
        """Called by every rank after each optimizer step; the same answer on all of them."""
        if self.world > 1 and step < self.next_vote:
            return NONE
        local = self.seen
        if self.deadline is not None and time.time() >= self.deadline:
            local = max(local, REQUEUE_DEADLINE)
        if self.max_time > 0 and self.elapsed is not None and self.elapsed() >= self.max_time:
            local = max(local, MAX_TIME)
        if self.world == 1:  # nobody to agree with: look every step
            return local
        self.vote[0] = local
        self.vote[1] = self._proposal(step) if self.rank == 0 else 0
        dist.all_reduce(self.vote, op=dist.ReduceOp.MAX, group=self.group)
        self.votes += 1
        self.next_vote = step + max(1, int(self.vote[1]))
        return int(self.vote[0])

    def _proposal(self, step: int) -> int:
        if self.check_every:
            return self.check_every
        last_step, last_time = self._since
        now = time.perf_counter()
        self._since = (step, now)
        per_step = (now - last_time) / max(1, step - last_step)
        return max(1, min(1000, int(self.target_s / max(per_step, 1e-6))))

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def requeue_slurm_job(reason: int) -> str | None:
    """`scontrol requeue` this SLURM job (or array task) when the stop asks for it; what was
    done, in words."""
    job = slurm_job_name()
    if reason not in (REQUEUE_SIGNAL, REQUEUE_DEADLINE) or not job:
        return None
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"SLURM job {job} not requeued: scontrol is not on PATH"
    out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return f"SLURM job {job} not requeued: scontrol said {out.stderr.strip() or out.returncode}"
    return f"SLURM job {job} requeued; it resumes from this checkpoint"
