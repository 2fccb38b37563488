"""`launch.submit --dry-run` for 4 nodes x 8 GPUs, for each launcher: the script is valid
bash, asks SLURM for what it should, and, run under a stand-in srun that starts it on four
"nodes", gives each node its own rank and all of them one rendezvous."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs/autoregressive/made.yaml")


def dry_run(launcher, *extra, python=sys.executable):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.submit",
            "--config",
            RECIPE,
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--launcher",
            launcher,
            "--partition",
            "gpu",
            "--time",
            "2-00:00:00",
            "--python",
            python,
            "--dry-run",
            *extra,
            "run.dir=/shared/runs/made",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fake_cluster(tmp_path):
    """srun/scontrol/squeue/scancel stand-ins: srun runs its command once per node with that
    node's SLURM_NODEID, as slurmstepd would; the "python" only records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(
        bin_dir / "srun",
        """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
for n in 0 1 2 3; do SLURM_NODEID=$n SLURMD_NODENAME=node-$n "$@"; done
""",
    )
    executable(bin_dir / "scontrol", "#!/bin/bash\nprintf 'node-0\\nnode-1\\nnode-2\\nnode-3\\n'\n")
    executable(bin_dir / "squeue", "#!/bin/bash\necho 2026-12-01T12:00:00\n")
    executable(bin_dir / "scancel", "#!/bin/bash\nexit 0\n")
    calls = tmp_path / "calls"
    python = executable(
        tmp_path / "python",
        f"""#!/bin/bash
echo "node=$SLURM_NODEID end=$TRIBUTARY_JOB_END $*" >> {calls}
""",
    )
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-[0-3]",
        SLURM_JOB_NUM_NODES="4",
        SLURM_JOB_NAME="made",
    )
    return env, python, calls, tmp_path


def run_script(script: str, env, cwd) -> None:
    script = script.replace("LOG_DIR=/shared/runs/made/slurm", f"LOG_DIR={cwd}/logs")
    out = subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "deepspeed"])
def test_dry_run_header(launcher):
    script = dry_run(launcher)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    header = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    for want in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=2-00:00:00",
        "--requeue",
        "--signal=B:USR1@300",
        "--output=/shared/runs/made/slurm/%x-%j.out",
    ):
        assert want in header, (want, header)
    assert f"set -- {RECIPE} run.dir=/shared/runs/made" in script
    # a node rank is never expanded in the batch shell (where it would be 0 on every node)
    for line in script.splitlines():
        if "SLURM_NODEID" in line and not line.lstrip().startswith("#"):
            assert "exec" in line, line  # only inside the single-quoted per-node command


def test_torchrun_nodes_share_one_rendezvous(fake_cluster):
    env, python, calls, tmp = fake_cluster
    run_script(dry_run("torchrun", python=str(python)), env, tmp)
    lines = calls.read_text().splitlines()
    assert len(lines) == 4
    endpoints = {re.search(r"--rdzv_endpoint (\S+)", line).group(1) for line in lines}
    assert endpoints == {"node-0:24242"}  # port from the job id: jobs sharing a node differ
    hosts = [re.search(r"is_host=(\d)", line).group(1) for line in lines]
    assert hosts == ["1", "0", "0", "0"]
    assert all("--nnodes 4 --nproc_per_node 8" in line and "--rdzv_id 4242" in line for line in lines)
    ends = {re.search(r"end=(\S*)", line).group(1) for line in lines}
    assert len(ends) == 1 and ends.pop().isdigit()  # the time limit reaches the ranks


def test_accelerate_nodes_get_their_own_machine_rank(fake_cluster):
    env, python, calls, tmp = fake_cluster
    run_script(dry_run("accelerate", python=str(python)), env, tmp)
    lines = calls.read_text().splitlines()
    ranks = [int(re.search(r"--machine_rank (\d+)", line).group(1)) for line in lines]
    assert ranks == [0, 1, 2, 3]
    for line in lines:
        assert "--num_machines 4 --num_processes 32" in line
        assert "--main_process_ip node-0 --main_process_port 24242" in line


def test_deepspeed_nodes_get_their_own_node_rank(fake_cluster):
    env, python, calls, tmp = fake_cluster
    run_script(dry_run("deepspeed", python=str(python)), env, tmp)
    lines = calls.read_text().splitlines()
    assert [int(re.search(r"--node_rank (\d+)", line).group(1)) for line in lines] == [0, 1, 2, 3]
    hostfile = Path(re.search(r"--hostfile (\S+)", lines[0]).group(1))
    assert hostfile.read_text().split("\n")[:4] == [f"node-{i} slots=8" for i in range(4)]
    assert all("--master_addr node-0 --master_port 24242" in line for line in lines)


def test_bad_recipe_is_refused_before_anything_is_queued():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.submit",
            "--config",
            RECIPE,
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "trainer.max_stepz=5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "trainer.max_stepz" in out.stderr
