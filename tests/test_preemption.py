"""Stopping early without losing a step, outside SLURM: a signal to one rank stops all of
them after the same step with a checkpoint and exit code 75; the job's end time does the
same; torchrun --max-restarts brings a killed rank back from the last checkpoint. Fake
squeue and scontrol commands check what the stop asks SLURM (tests/test_slurm.py asks a
real one)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from launching import (
    RECIPE,
    ROOT,
    STEPS,
    accelerate_cmd,
    assert_matches_reference,
    last_step,
    ranks_of,
    run_ok,
    smoke_overrides,
    torchrun_cmd,
    train_records,
    wait_until,
)

from trainer.preempt import EXIT_STOPPED


@pytest.mark.drill  # make test: the same across two nodes, tests/test_multinode.py
def test_usr1_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, digits_dir, cpu_env, smoke_reference):
    run_dir = tmp_path / "run"
    cmd = accelerate_cmd() + smoke_overrides(run_dir, digits_dir)
    proc = subprocess.Popen(cmd, env=cpu_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: 20 <= last_step(run_dir) < STEPS - 100, 120, "step 20", proc)
    ranks = ranks_of(proc.pid)
    assert sorted(ranks) == [0, 1]
    ranks[1].send_signal(signal.SIGUSR1)  # rank 0 never sees a signal
    out = proc.communicate(timeout=120)[0]
    stopped = [line for line in out.splitlines() if line.startswith("stopped after step")]
    assert stopped and "(SIGUSR1)" in stopped[0], out[-3000:]
    step = int(stopped[0].split()[3])
    assert 20 <= step < STEPS
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    assert (ckpt / "COMPLETE.json").exists()
    assert sorted(p.name for p in ckpt.glob("data-rank*.json")) == ["data-rank0.json", "data-rank1.json"]
    assert not (run_dir / "final_metrics.json").exists()
    assert "exitcode  : 75" in out  # each rank's own code, in the launcher's report
    assert train_records(run_dir)[-1]["step"] == step

    out = run_ok(cmd, cpu_env)  # the same command again
    assert f"resumed from {ckpt} (step {step}, exact)" in out
    assert_matches_reference(run_dir, smoke_reference)


def test_job_end_time_stops_and_saves_with_exit_75(tmp_path, digits_dir, cpu_env):
    """TRIBUTARY_JOB_END (set by slurm/*.sbatch) minus trainer.end_margin_s is a deadline."""
    run_dir = tmp_path / "run"
    env = dict(cpu_env, TRIBUTARY_JOB_END=str(time.time() + 3600))
    # the deadline is an hour away, less a margin of an hour minus 8 s: 8 s from now
    cmd = [sys.executable, "-m", "launch.train", "--config", RECIPE]
    cmd += smoke_overrides(
        run_dir, digits_dir, "trainer.max_steps=100000", "trainer.checkpoint_every=0", "trainer.end_margin_s=3592"
    )
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == EXIT_STOPPED, out.stdout[-2000:] + out.stderr[-3000:]
    assert "(the job's time limit)" in out.stdout
    assert "requeued" not in out.stdout  # not under SLURM: nothing to requeue
    step = train_records(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / f"step-{step}" / "COMPLETE.json").exists()


@pytest.mark.drill  # make test: the same across two nodes, tests/test_multinode.py
def test_torchrun_max_restarts_resumes_a_killed_rank(tmp_path, digits_dir, cpu_env, smoke_reference):
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(max_restarts=1) + smoke_overrides(run_dir, digits_dir)
    proc = subprocess.Popen(cmd, env=cpu_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def done():
        return (run_dir / "checkpoints/step-80/COMPLETE.json").exists() and last_step(run_dir) >= 90

    wait_until(done, 120, "checkpoint 80 and step 90", proc)
    killed_at = last_step(run_dir)
    assert killed_at < STEPS
    ranks_of(proc.pid)[1].kill()  # SIGKILL: no chance to save
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-5000:]
    assert "resumed from" in out and "step-80 (step 80, exact)" in out, out[-3000:]
    assert_matches_reference(run_dir, smoke_reference)


def test_job_end_time_from_the_env_or_from_squeue(tmp_path, monkeypatch):
    from trainer.preempt import job_end_time

    monkeypatch.setenv("TRIBUTARY_JOB_END", "1800000000")
    assert job_end_time() == 1800000000.0
    monkeypatch.delenv("TRIBUTARY_JOB_END")
    fake = tmp_path / "squeue"
    fake.write_text("#!/bin/bash\n[[ $* == '-h -j 77 -o %e' ]] && echo 2026-12-01T12:30:00\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert job_end_time() is None  # only the rank that asks (rank 0) asks SLURM
    assert job_end_time(ask_slurm=True) == time.mktime((2026, 12, 1, 12, 30, 0, 0, 0, -1))
    fake.write_text("#!/bin/bash\necho UNLIMITED\n")
    assert job_end_time(ask_slurm=True) is None


def fake_slurm_command(folder, name: str, script: str) -> None:
    fake = folder / name
    fake.write_text("#!/bin/bash\n" + script)
    fake.chmod(0o755)


def test_an_array_task_requeues_itself_not_its_array(tmp_path, monkeypatch):
    """To scontrol an array's own job id means every task of the array, and one task's
    SLURM_JOB_ID is that id; ARRAYID_TASKID is the task alone."""
    from trainer.preempt import REQUEUE_SIGNAL, TERM, requeue_slurm_job

    argv = tmp_path / "argv"
    fake_slurm_command(tmp_path, "scontrol", f'echo "$*" >> {argv}\n')
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "41")  # the task SLURM starts last keeps the array's id
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert requeue_slurm_job(REQUEUE_SIGNAL) == "SLURM job 41_1 requeued; it resumes from this checkpoint"
    assert requeue_slurm_job(TERM) is None  # SIGTERM: SLURM decides
    assert argv.read_text() == "requeue 41_1\n"

    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    requeue_slurm_job(REQUEUE_SIGNAL)
    assert argv.read_text() == "requeue 41_1\nrequeue 42\n"


def test_an_array_task_asks_squeue_for_its_own_end_time(tmp_path, monkeypatch):
    """`squeue -j ARRAYID` lists every task: one end time per line, which is no time."""
    from trainer.preempt import job_end_time

    fake_slurm_command(tmp_path, "squeue", "[[ $* == '-h -j 41_1 -o %e' ]] && echo 2026-12-01T12:30:00\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("TRIBUTARY_JOB_END", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert job_end_time(ask_slurm=True) == time.mktime((2026, 12, 1, 12, 30, 0, 0, 0, -1))
