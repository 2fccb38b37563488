"""Ctrl-C, as a terminal sends it (SIGINT to the launch's foreground process group): the first
is an agreed stop like SIGTERM (every rank stops after the same step, saves, and says where
the checkpoint is, without a traceback of ours); a second exits at once and leaves at most a
`.partial` folder that no resume chooses."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
from launching import (
    RECIPE,
    ROOT,
    STEPS,
    accelerate_cmd,
    assert_matches_reference,
    last_step,
    run_ok,
    smoke_overrides,
    torchrun_cmd,
    wait_until,
)

from trainer.preempt import EXIT_INTERRUPTED, EXIT_STOPPED

# a frame of our own code in a traceback (the launchers print their own on a signal)
OUR_FRAME = re.compile(r'File ".*/(launch|trainer|data_pipelines|models)/[^"]+\.py"')


def ctrl_c(cmd, env, run_dir, at_step=25):
    """Start `cmd` in a session of its own, as a shell runs a foreground job, and send SIGINT
    to its process group once `at_step` is logged: (return code, output, the stop line's step)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    wait_until(lambda: last_step(run_dir) >= at_step, 180, f"step {at_step}", proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running after the launcher exited: {alive}"
    stopped = [line for line in out.splitlines() if line.startswith("stopped after step")]
    assert len(stopped) == 1 and "(SIGINT)" in stopped[0], out[-4000:]
    assert "KeyboardInterrupt" not in out and not OUR_FRAME.search(out), out[-4000:]
    return proc.returncode, out, int(stopped[0].split()[3])


def check_stopped_run(run_dir, step, out):
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    assert f"checkpoint {ckpt} is complete" in out
    assert (ckpt / "COMPLETE.json").exists()
    assert sorted(p.name for p in ckpt.glob("data-rank*.json")) == ["data-rank0.json", "data-rank1.json"]
    assert not (run_dir / "final_metrics.json").exists()
    assert not list((run_dir / "checkpoints").glob(".*partial"))
    return ckpt


def test_ctrl_c_under_accelerate_launch_saves_and_resumes_exactly(tmp_path, digits_dir, cpu_env, smoke_reference):
    run_dir = tmp_path / "run"
    # data-loader workers too: they share the ranks' sessions and must not print tracebacks
    cmd = accelerate_cmd() + smoke_overrides(run_dir, digits_dir)
    rc, out, step = ctrl_c(cmd, cpu_env, run_dir)
    assert 25 <= step < STEPS
    # torch's elastic agent (accelerate launch's and torchrun's) raises its own SignalException
    # on a SIGINT and exits 1, once the ranks it signalled are done
    assert rc == 1 and "SignalException" in out, out[-3000:]
    ckpt = check_stopped_run(run_dir, step, out)
    out = run_ok(cmd, cpu_env)
    assert f"resumed from {ckpt} (step {step}, exact)" in out
    assert_matches_reference(run_dir, smoke_reference)


def test_ctrl_c_under_torchrun_saves_a_complete_checkpoint(tmp_path, digits_dir, cpu_env):
    run_dir = tmp_path / "run"
    rc, out, step = ctrl_c(torchrun_cmd() + smoke_overrides(run_dir, digits_dir), cpu_env, run_dir)
    assert 25 <= step < STEPS
    check_stopped_run(run_dir, step, out)


def test_ctrl_c_of_a_single_process_exits_75_and_a_second_exits_at_once(tmp_path, digits_dir, cpu_env):
    """Without a launcher the process itself gets both signals: the first stops and saves
    (exit 75, data-loader workers quiet); with a save paused inside step-40, a second leaves
    the run at once (130) with only `.step-40.partial`, and the resume takes step-20."""
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "launch.train", "--config", RECIPE]
    overrides = smoke_overrides(run_dir, digits_dir, "trainer.checkpoint_every=20", "data.num_workers=2")
    rc, out, step = ctrl_c(base + overrides, cpu_env, run_dir, at_step=5)
    assert rc == EXIT_STOPPED, out[-3000:]

    flag = tmp_path / "paused"
    env = dict(cpu_env, TRIBUTARY_FAILPOINTS="save.marker@40=pause", TRIBUTARY_FAILPOINT_FLAG=str(flag))
    proc = subprocess.Popen(
        base + overrides,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_until(flag.exists, 180, "the step-40 save to pause", proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1)  # the first is noted; the paused save never reaches the stop
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:]
    assert "second SIGINT: exiting now without saving" in out
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / ".step-40.partial").is_dir() and not (checkpoints / "step-40").exists()
    # the newest finished one: step-20, or the first stop's save when that landed later (the
    # stop is voted on about once a second, so a fast loader can carry it past step 20)
    done = [int(d.name.removeprefix("step-")) for d in checkpoints.glob("step-*") if (d / "COMPLETE.json").exists()]
    newest = max(done)
    assert 20 <= newest < 40 and 20 in done
    out = run_ok(base + overrides + ["trainer.max_steps=45"], cpu_env)
    assert f"resumed from {checkpoints / f'step-{newest}'} (step {newest}, exact)" in out
    assert (checkpoints / "step-45" / "COMPLETE.json").exists()
