"""Against a real SLURM controller on loopback (slurm/loopback.sh: munged, slurmctld and
slurmd from Debian's packages): `launch.submit` renders and submits the templates in
slurm/, `sbatch --wait` waits for the job, and the run must match an uninterrupted one step
for step, through a SIGUSR1, a checkpoint, `scontrol requeue` and a resume. An array task
requeues itself and no other task; launch.submit's usage names recipes that exist."""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
from launching import ROOT, STEPS, assert_matches_reference, last_step, smoke_overrides, train_records, wait_until


@pytest.fixture(scope="module")
def slurm_env():
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("slurm/loopback.sh needs root to start slurmd")
    out = subprocess.run(["bash", str(ROOT / "slurm/loopback.sh")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr  # installed but would not start: a failure
    env = dict(os.environ, SLURM_CONF=out.stdout.strip().split("=", 1)[1])
    return env


def submit(env, run_dir, digits_dir, launcher, *more, wait, nodes=1, procs=2):
    cmd = [
        sys.executable,
        "-m",
        "launch.submit",
        "--config",
        str(ROOT / "configs/autoregressive/made.yaml"),
        "--nodes",
        str(nodes),
        "--gpus-per-node",
        str(procs),
        "--cpu",
        "--launcher",
        launcher,
    ]
    cmd += ["--wait"] if wait else []
    cmd += smoke_overrides(run_dir, digits_dir, *more)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_submit_usage_names_recipes_that_exist():
    """launch.submit's --help starts with its module docstring: its examples must run."""
    doc = ast.get_docstring(ast.parse((ROOT / "launch/submit.py").read_text()))
    recipes = re.findall(r"--config (\S+)", doc)
    assert recipes and [r for r in recipes if not (ROOT / r).is_file()] == [], recipes


def job_state(env, job):
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    found = re.search(r"JobState=(\S+)", out.stdout)
    # an ended job's record is purged after MinJobAge (4 s): the logs tell how it ended
    return found.group(1) if found else "GONE"


def logs(out):
    """The batch shell's log and node 0's, from the paths launch.submit printed."""
    found = re.search(r"batch log +(\S+)", out)
    assert found, out
    batch = found.group(1)
    node0 = re.search(r"node logs +(\S+)", out).group(1).replace("<N>", "0")
    with open(batch) as b, open(node0) as n:
        return b.read(), n.read()


@pytest.mark.drill  # make test: the preempted smoke job below also runs 2 ranks to the end
def test_sbatch_runs_the_smoke_recipe_on_two_ranks(tmp_path, digits_dir, slurm_env, smoke_reference):
    run_dir = tmp_path / "run"
    proc = submit(slurm_env, run_dir, digits_dir, "accelerate", wait=True)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    batch_log, node_log = logs(out)
    assert "restart 0" in batch_log and "training step exited with 0" in batch_log
    assert "backend: Accelerate DDP on 2 rank(s)" in node_log
    assert_matches_reference(run_dir, smoke_reference)


def preempt_once(tmp_path, digits_dir, slurm_env, launcher, *more):
    """`launch.submit --wait` (so `sbatch --wait`), SIGUSR1 to the batch shell mid-run, and
    the job's own requeue and resume; the run dir. sbatch --wait follows the requeued job
    and returns its exit code."""
    run_dir = tmp_path / "run"
    proc = submit(slurm_env, run_dir, digits_dir, launcher, *more, wait=True)
    out = "".join(proc.stdout.readline() for _ in range(6))  # what submit prints at once
    job = re.search(r"submitted job (\d+)", out).group(1)
    wait_until(lambda: 20 <= last_step(run_dir), 180, "step 20", proc)
    # what `#SBATCH --signal=B:USR1@GRACE` does before the time limit: signal the batch shell
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True)
    out += proc.stdout.read()  # (communicate() would miss what readline buffered)
    assert proc.wait(timeout=400) == 0, out
    assert job_state(slurm_env, job) in ("COMPLETED", "GONE")
    batch_log, node_log = logs(out)
    assert batch_log.rstrip().endswith("training step exited with 0"), batch_log[-2000:]
    assert "batch shell: SIGUSR1, telling the ranks" in batch_log
    assert "restart 0" in batch_log and "restart 1" in batch_log, batch_log
    stopped = re.search(r"stopped after step (\d+) \(SIGUSR1\)", node_log)
    assert stopped, node_log[-3000:]
    step = int(stopped.group(1))
    assert 20 <= step < STEPS
    assert f"SLURM job {job} requeued" in node_log
    assert f"resumed from {run_dir}/checkpoints/step-{step} (step {step}, exact)" in node_log
    return run_dir


def test_smoke_job_saves_on_usr1_requeues_itself_and_finishes(tmp_path, digits_dir, slurm_env, smoke_reference):
    run_dir = preempt_once(tmp_path, digits_dir, slurm_env, "torchrun")
    assert_matches_reference(run_dir, smoke_reference)


@pytest.mark.drill
def test_deepspeed_launcher_preemption(tmp_path, digits_dir, slurm_env):
    """slurm/deepspeed.sbatch (`deepspeed --no_ssh`), ZeRO-2: every rank saves its partition."""
    run_dir = preempt_once(
        tmp_path, digits_dir, slurm_env, "deepspeed", "trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=2"
    )
    assert [r["step"] for r in train_records(run_dir)] == list(range(1, STEPS + 1))
    assert (run_dir / "final_metrics.json").exists()


ARRAY_TASK = """#!/bin/bash
#SBATCH --array=0-1 --requeue --mem=100M --time=5 --open-mode=append --output={dir}/task-%a.out
# One task's own job id is the array's (SLURM gives it to the task it starts last): to
# scontrol that number means the whole array. That task requeues itself once, as
# launch.train does on SIGUSR1; the other runs beside it until the requeued task is back.
cd {root}
if [[ $SLURM_JOB_ID == "$SLURM_ARRAY_JOB_ID" ]]; then role=requeuer; else role=bystander; fi
echo "start $role restart ${{SLURM_RESTART_COUNT:-0}}"
wait_for() {{ for _ in $(seq 240); do [[ -e {dir}/$1 ]] && return; sleep 0.25; done; }}
if [[ $role == bystander ]]; then
  touch {dir}/started; wait_for resumed; exit 0
fi
if [[ ${{SLURM_RESTART_COUNT:-0}} != 0 ]]; then touch {dir}/resumed; exit 0; fi
wait_for started
{python} -c "from trainer.preempt import *; print(requeue_slurm_job(REQUEUE_SIGNAL), flush=True)"
sleep 60  # the requeue ends this run
"""


def test_an_array_task_requeues_itself_and_not_the_other_task(tmp_path, slurm_env):
    script = tmp_path / "array.sbatch"
    script.write_text(ARRAY_TASK.format(dir=tmp_path, root=ROOT, python=sys.executable))
    out = subprocess.run(["sbatch", "--wait", str(script)], env=slurm_env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    array = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)
    logs = {task: (tmp_path / f"task-{task}.out").read_text() for task in (0, 1)}
    restarts, task_of = {}, {}  # role: SLURM_RESTART_COUNT of each run; role: array index
    for task, log in logs.items():
        for _, role, _, restart in (line.split() for line in log.splitlines() if line.startswith("start ")):
            restarts.setdefault(role, []).append(int(restart))
            task_of[role] = task
    assert restarts == {"requeuer": [0, 1], "bystander": [0]}, logs  # by the array's id: bystander [0, 1]
    assert f"SLURM job {array}_{task_of['requeuer']} requeued" in logs[task_of["requeuer"]]


@pytest.mark.parametrize("template", ["torchrun", "accelerate", "deepspeed"])
def test_templates_signal_and_ask_about_the_array_task_alone(template):
    """The USR1 hand-off (scancel) and the time-limit lookup (squeue) name an array task as
    ARRAYID_TASKID: its bare SLURM_JOB_ID can be the array's own id, which means every task."""
    text = (ROOT / "slurm" / f"{template}.sbatch").read_text()
    job_lines = [line for line in text.splitlines() if line.startswith("JOB=")]
    assert 'scancel --signal=USR1 "$JOB"' in text and 'squeue -h -j "$JOB"' in text
    script = "\n".join(job_lines + ['echo "$JOB"'])
    for env, want in (
        ({"SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "1"}, "41_1"),
        ({"SLURM_JOB_ID": "42"}, "42"),
    ):
        out = subprocess.run(
            ["bash", "-c", script], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == want
