"""Two real SLURM nodes on one machine (slurm/loopback.sh --nodes 2): one slurmctld, a
slurmd for tributary0 in this network namespace and one for tributary1 in a namespace of
its own, each with its own address. `launch.submit --nodes 2` runs one rank per node
through each sbatch template, so the rendezvous, the head node's address and every
collective cross the virtual link; the runs must match the one-node reference step for
step, through a SIGUSR1 stop and requeue, and through the loss of node 1 mid-run (SLURM
marks it DOWN, requeues the job, and the run resumes from its last complete checkpoint
once the node is back)."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from launching import ROOT, STEPS, last_step, train_records, wait_until
from test_slurm import submit

NAMESPACE = "tributary-node1"  # node 1's network namespace, as slurm/loopback.sh names it
LOOPBACK = ["bash", str(ROOT / "slurm/loopback.sh")]


@pytest.fixture(scope="module")
def two_node_env():
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge; .ci/run does)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (apt-get install iproute2; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("slurm/loopback.sh needs root for slurmd and a network namespace")
    out = subprocess.run(LOOPBACK + ["--nodes", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr  # installed but would not start: a failure
    env = dict(os.environ, SLURM_CONF=out.stdout.strip().splitlines()[-1].split("=", 1)[1])
    nodes = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N"], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert nodes == ["tributary0", "tributary1"], nodes
    return env


def assert_same_run(run_dir, reference, exact_grad_norm=True):
    """Every step once, in order, with the reference's loss and LR bit for bit, and its final
    metrics. DeepSpeed sums the gradient norm in another order: the same to 1e-6 there."""
    ref, got = train_records(reference), train_records(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("train/loss", "train/lr"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
    norms = [(r["train/grad_norm"], s["train/grad_norm"]) for r, s in zip(got, ref)]
    if exact_grad_norm:
        assert [a for a, _ in norms] == [b for _, b in norms]
    else:
        assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in norms)
    assert (Path(run_dir) / "final_metrics.json").read_text() == (Path(reference) / "final_metrics.json").read_text()


def net_namespace(pid) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def ranks_by_node(job) -> dict[str, list[psutil.Process]]:
    """The training processes of a SLURM job (not their loader workers), by node name."""
    found = {}
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if env.get("SLURM_JOB_ID") == job and "RANK" in env and "launch.train" in " ".join(p.cmdline()):
                found[p.pid] = (env.get("SLURMD_NODENAME"), p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    by_node = {}
    for node, p in (v for pid, v in found.items() if _parent(v[1]) not in found):
        by_node.setdefault(node, []).append(p)
    return by_node


def _parent(p):
    try:
        return p.ppid()
    except psutil.NoSuchProcess:
        return None


def assert_one_rank_per_node_namespace(job):
    """Node 0's rank in this network namespace, node 1's in its own: their traffic crosses
    the veth pair."""
    deadline = time.time() + 60
    while (by_node := ranks_by_node(job)).keys() != {"tributary0", "tributary1"}:
        assert time.time() < deadline, f"no rank on each node: {by_node}"
        time.sleep(0.2)
    assert [len(v) for v in by_node.values()] == [1, 1], by_node
    node1_ns = os.stat(f"/run/netns/{NAMESPACE}").st_ino
    assert net_namespace(by_node["tributary0"][0].pid) == net_namespace(os.getpid()) != node1_ns
    assert net_namespace(by_node["tributary1"][0].pid) == node1_ns
    return by_node


def read_logs(out) -> tuple[str, list[str]]:
    """The batch shell's log and each node's, from the paths launch.submit printed."""
    batch = re.search(r"batch log +(\S+)", out).group(1)
    nodes = re.search(r"node logs +(\S+)", out).group(1)
    return Path(batch).read_text(), [Path(nodes.replace("<N>", str(i))).read_text() for i in (0, 1)]


def job_of(proc) -> tuple[str, str]:
    out = "".join(proc.stdout.readline() for _ in range(6))  # what submit prints at once
    found = re.search(r"submitted job (\d+): 2 node\(s\) x 1 rank\(s\)", out)
    assert found, out + proc.stdout.read()
    return found.group(1), out


def scancel_if_left(env, job):
    subprocess.run(["scancel", job], env=env, capture_output=True)


LAUNCHERS = {
    "torchrun": (),
    "accelerate": (),
    "deepspeed": ("trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=2"),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_node_job_matches_the_one_node_reference(launcher, tmp_path, digits_dir, two_node_env, smoke_reference):
    run_dir = tmp_path / "run"
    proc = submit(two_node_env, run_dir, digits_dir, launcher, *LAUNCHERS[launcher], wait=True, nodes=2, procs=1)
    job, out = job_of(proc)
    try:
        assert_one_rank_per_node_namespace(job)
        out += proc.communicate(timeout=400)[0]
    finally:
        scancel_if_left(two_node_env, job)
    assert proc.returncode == 0, out
    batch, (node0, _) = read_logs(out)
    assert "restart 0): 2 node(s) x 1" in batch and batch.rstrip().endswith("training step exited with 0")
    assert "tributary0:" in batch  # the head: node 0's name, resolved on both nodes
    # the host name resolves to loopback on both nodes: gloo had to be pointed at the link
    assert "collectives over tribslurm0" in node0, node0[-3000:]
    assert "on 2 rank(s)" in node0
    assert_same_run(run_dir, smoke_reference, exact_grad_norm=launcher != "deepspeed")


@pytest.mark.parametrize(
    "launcher",
    [
        "torchrun",
        pytest.param("accelerate", marks=pytest.mark.drill),
        pytest.param("deepspeed", marks=pytest.mark.drill),
    ],
)
def test_two_node_job_saves_on_usr1_requeues_and_resumes(launcher, tmp_path, digits_dir, two_node_env, smoke_reference):
    """SIGUSR1 to the batch shell on node 0 (what `--signal=B:USR1@GRACE` sends before the
    time limit); it passes the signal to the ranks on both nodes, which agree on a step, save
    their parts, requeue the job and leave; the rerun on the same two nodes resumes from
    that checkpoint. `sbatch --wait` follows the job through the requeue."""
    env, run_dir = two_node_env, tmp_path / "run"
    proc = submit(env, run_dir, digits_dir, launcher, *LAUNCHERS[launcher], wait=True, nodes=2, procs=1)
    job, out = job_of(proc)
    try:
        wait_until(lambda: 20 <= last_step(run_dir), 240, "step 20", proc)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
        out += proc.communicate(timeout=400)[0]
    finally:
        scancel_if_left(env, job)
    assert proc.returncode == 0, out
    batch, (node0, node1) = read_logs(out)
    assert "batch shell: SIGUSR1, telling the ranks" in batch
    # both runs of the job had both nodes: after the stop, rank 0's `scontrol requeue` (with
    # no requeue the stopped job would end here, exit 75)
    assert "restart 0): 2 node(s) x 1" in batch and "restart 1): 2 node(s) x 1" in batch, batch
    assert batch.rstrip().endswith("training step exited with 0"), batch[-2000:]
    stopped = re.search(r"stopped after step (\d+) \(SIGUSR1\)", node0 + node1)
    assert stopped, node0[-3000:]
    step = int(stopped.group(1))
    assert 20 <= step < STEPS
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    assert f"resumed from {ckpt} (step {step}, exact)" in node0 + node1
    assert "collectives over tribslurm0" in node0
    assert_same_run(run_dir, smoke_reference, exact_grad_norm=launcher != "deepspeed")


def job_state(env, job) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
    return out.stdout.strip() or "GONE"


def node_state(env, node) -> str:
    return subprocess.run(
        ["sinfo", "-h", "-n", node, "-o", "%T"], env=env, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.drill
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_losing_node_1_requeues_the_job_and_resumes_from_the_last_checkpoint(
    launcher, tmp_path, digits_dir, two_node_env, smoke_reference
):
    """Node 1 vanishes mid-run (its slurmd, step daemon and rank SIGKILLed at once). Node 0's
    rank loses its peer and exits 4; srun cannot finish the step until slurmctld gives up on
    the node (SlurmdTimeout) and marks it DOWN, which ends the step and requeues the job
    (--requeue). The job waits for two nodes; node 1's slurmd comes back, the node returns
    to service, and the rerun resumes from the last checkpoint both ranks completed."""
    env, run_dir = two_node_env, tmp_path / "run"
    proc = submit(env, run_dir, digits_dir, launcher, *LAUNCHERS[launcher], wait=True, nodes=2, procs=1)
    job, out = job_of(proc)
    try:
        by_node = assert_one_rank_per_node_namespace(job)

        def past_checkpoint():
            return (run_dir / "checkpoints/step-40/COMPLETE.json").exists() and last_step(run_dir) >= 50

        wait_until(past_checkpoint, 240, "checkpoint 40 and step 50", proc)
        killed = subprocess.run(LOOPBACK + ["kill-node", "1"], capture_output=True, text=True)
        assert killed.returncode == 0, killed.stdout + killed.stderr
        rank1 = by_node["tributary1"][0]
        assert not rank1.is_running() or rank1.status() == psutil.STATUS_ZOMBIE
        assert last_step(run_dir) < STEPS and not (run_dir / "final_metrics.json").exists()
        # slurmctld notices in SlurmdTimeout (10 s) plus a ping interval, then requeues
        wait_until(lambda: job_state(env, job) == "PENDING", 120, "the job requeued", proc)
        assert node_state(env, "tributary1").startswith("down"), node_state(env, "tributary1")
        back = subprocess.run(LOOPBACK + ["--nodes", "2"], capture_output=True, text=True, timeout=120)
        assert back.returncode == 0, back.stdout + back.stderr
        out += proc.communicate(timeout=400)[0]
    finally:
        scancel_if_left(env, job)
        subprocess.run(LOOPBACK + ["--nodes", "2"], capture_output=True, timeout=120)
    assert proc.returncode == 0, out
    batch, (node0, _) = read_logs(out)
    assert "DUE TO NODE FAILURE" in batch, batch
    assert "restart 0)" in batch and "restart 1)" in batch, batch
    assert batch.rstrip().endswith("training step exited with 0"), batch[-2000:]
    lost = re.search(r"lost contact with another rank after step (\d+) .*Last complete checkpoint: (\S+?);", node0)
    assert lost, node0[-4000:]
    kept = Path(lost.group(2))
    step = int(kept.name.split("-")[1])
    assert 40 <= step <= int(lost.group(1)) < STEPS
    assert f"resumed from {kept} (step {step}, exact)" in node0, node0[-3000:]
    assert_same_run(run_dir, smoke_reference, exact_grad_norm=launcher != "deepspeed")
