"""A run dir that cannot be clobbered: one launch writes it at a time (run.dir/lock.json with a
heartbeat; a dead or requeued holder is taken over), a resume refuses another model's
checkpoint by its model.* keys before loading anything, and the run's record of how its
checkpoints were made survives every launch, refused ones too."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from launching import RECIPE, ROOT, accelerate_cmd, last_step, run_ok, smoke_overrides, wait_until

from trainer.rundir import LOCK, RunDirLock, RunDirLocked


def forge_lock(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    holder = dict(host="node-b", pid=4242, slurm_job=None, started=now - 60, heartbeat=now, token="theirs")
    holder.update(fields)
    (run_dir / LOCK).write_text(json.dumps(holder))


def test_a_live_holder_on_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path, caplog):
    forge_lock(tmp_path)
    with pytest.raises(RunDirLocked, match=r"in use by another launch \(pid 4242 on node-b, .*last heartbeat 0s ago"):
        RunDirLock.acquire(tmp_path, stale_s=1.0)
    time.sleep(1.2)  # node-b's holder stops beating
    lock = RunDirLock.acquire(tmp_path, stale_s=1.0)
    assert "taking over the lock of pid 4242 on node-b" in caplog.text and "no heartbeat for 1s" in caplog.text
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists() and not list(tmp_path.glob(".lock*"))


def test_the_same_slurm_job_takes_over_at_once_and_another_job_does_not(tmp_path, caplog):
    forge_lock(tmp_path, slurm_job="77")
    with pytest.raises(RunDirLocked, match="SLURM job 77"):
        RunDirLock.acquire(tmp_path, stale_s=600, slurm_job="78")  # a second sbatch
    lock = RunDirLock.acquire(tmp_path, stale_s=600, slurm_job="77")  # the requeued job
    assert "it is this SLURM job (77), requeued or restarted" in caplog.text
    lock.release()


def test_the_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    lock = RunDirLock.acquire(tmp_path, stale_s=3.0)  # a beat every 0.5 s
    first = json.loads((tmp_path / LOCK).read_text())["heartbeat"]
    wait_until(lambda: json.loads((tmp_path / LOCK).read_text())["heartbeat"] > first, 5, "a heartbeat")
    forge_lock(tmp_path, token="usurper")
    wait_until(lambda: lock.lost is not None, 5, "the holder to notice")
    assert "pid 4242 on node-b" in lock.lost
    lock.release()  # not ours any more: left alone
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "usurper"


def launch(run_dir, digits_dir, *more, **kw):
    cmd = [sys.executable, "-m", "launch.train", "--config", RECIPE] + smoke_overrides(run_dir, digits_dir, *more)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_a_second_launch_into_a_busy_run_dir_is_refused_naming_the_holder(tmp_path, digits_dir, cpu_env):
    run_dir = tmp_path / "run"
    first = launch(run_dir, digits_dir, "trainer.max_steps=100000", env=cpu_env)
    wait_until(lambda: last_step(run_dir) >= 3, 120, "the first launch to train", first)
    # a whole second launch (2 ranks under accelerate launch) ends, without touching the run
    second = subprocess.run(
        accelerate_cmd() + smoke_overrides(run_dir, digits_dir),
        cwd=ROOT,
        env=cpu_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode != 0
    assert (
        f"run.dir {run_dir} is in use by another launch (pid {first.pid} on {socket.gethostname()}" in second.stderr
    ), second.stderr[-3000:]
    assert json.loads((run_dir / LOCK).read_text())["pid"] == first.pid
    assert sorted(p.name for p in (run_dir / "launches").iterdir()) == ["1.yaml"]
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 75
    assert not (run_dir / LOCK).exists()  # released on the way out


def test_a_sigkilled_holder_is_taken_over(tmp_path, digits_dir, cpu_env):
    run_dir = tmp_path / "run"
    first = launch(run_dir, digits_dir, "trainer.max_steps=100000", "trainer.checkpoint_every=5", env=cpu_env)
    wait_until(lambda: (run_dir / "checkpoints/step-5/COMPLETE.json").exists(), 120, "step-5", first)
    first.kill()
    first.wait()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == first.pid  # left behind
    out = run_ok(
        [sys.executable, "-m", "launch.train", "--config", RECIPE]
        + smoke_overrides(run_dir, digits_dir, "trainer.max_steps=12", "trainer.lock_stale_s=3600"),
        cpu_env,
    )
    assert f"taking over the lock of pid {first.pid} on {socket.gethostname()}" in out
    assert f"its process {first.pid} on this host is gone" in out
    assert "resumed from" in out and not (run_dir / LOCK).exists()


def test_a_changed_model_is_refused_by_key_and_the_record_survives(tmp_path, digits_dir, cpu_env):
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "launch.train", "--config", RECIPE]
    run_ok(base + smoke_overrides(run_dir, digits_dir, "trainer.max_steps=10", "model.hidden=[96]"), cpu_env)
    record = (run_dir / "config.yaml").read_text()
    assert record.startswith("# launches/1.yaml: the checkpoints from step-10 on were written with it")
    ckpt = run_dir / "checkpoints/step-10"
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["model"]["hidden"] == [96]

    out = subprocess.run(
        base + smoke_overrides(run_dir, digits_dir, "trainer.max_steps=20", "model.hidden=[64]"),
        cwd=ROOT,
        env=cpu_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        f"{ckpt} was written for another model, and nothing was loaded: model.hidden: the checkpoint "
        "has [96], this recipe [64]; use a new run.dir, or trainer.resume=never"
    ) in out.stderr
    assert "Traceback" not in out.stderr and "size mismatch" not in out.stderr
    assert (run_dir / "config.yaml").read_text() == record  # still says how step-10 was made
    assert yaml.safe_load((run_dir / "launches/2.yaml").read_text())["model"]["hidden"] == [64]
    assert not (run_dir / LOCK).exists()


def test_what_may_change_on_resume(tmp_path, digits_dir, cpu_env):
    """max_steps, the LR schedule, logging, data URLs (the same shards spelled another way),
    a model key that leaves every shape alone (with a note), and the world size (2 ranks -> 1)."""
    run_dir = tmp_path / "run"
    run_ok(accelerate_cmd() + smoke_overrides(run_dir, digits_dir, "trainer.max_steps=10"), cpu_env)
    os.symlink(digits_dir, tmp_path / "digits-again")
    out = run_ok(
        [sys.executable, "-m", "launch.train", "--config", RECIPE]
        + smoke_overrides(
            run_dir,
            tmp_path / "digits-again",
            "trainer.max_steps=16",
            "optim.schedule=constant",
            "trainer.log_every=2",
            "optim.lr=0.0005",
            "model.mask_seed=1",
        ),
        cpu_env,
    )
    assert "resumed from" in out and "(step 10, elastic: 2 rank(s)" in out
    assert "model.* changed on resume, every parameter's name and shape the same: model.mask_seed: 0 -> 1" in out
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 16
    record = (run_dir / "config.yaml").read_text()
    assert record.startswith("# launches/2.yaml: the checkpoints from step-16 on")
    assert yaml.safe_load(record)["trainer"]["max_steps"] == 16


def test_a_restart_of_the_same_torchrun_launch_takes_over_and_a_new_launch_does_not(tmp_path, monkeypatch):
    forge_lock(tmp_path, launch="job-7", restart=0)  # rank 0 of the first start, on node-b
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # another launch with that id
    with pytest.raises(RunDirLocked):
        RunDirLock.acquire(tmp_path, stale_s=600)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the agent restarted the ranks
    RunDirLock.acquire(tmp_path, stale_s=600).release()
