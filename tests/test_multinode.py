"""Two nodes on one machine: two Linux network namespaces joined by a veth pair, each with
its own address and one rank. Node ranks, the head node's address, the c10d rendezvous and
the collectives all cross a real (virtual) link, which a one-node launch never exercises.
The runs must train and resume exactly like the one-node reference."""

import os
import shutil
import signal
import subprocess

import pytest
from launching import (
    ROOT,
    STEPS,
    accelerate_cmd,
    assert_matches_reference,
    last_step,
    ranks_of,
    smoke_overrides,
    torchrun_cmd,
    wait_until,
)

PORT = 29400


@pytest.fixture(scope="module")
def two_nodes():
    """[(namespace, address)] for node 0 and node 1; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (apt-get install iproute2)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"{os.getpid() % 100000}"
    nodes = [(f"trib{tag}n{i}", f"10.231.{int(tag) % 250}.{i + 1}") for i in range(2)]
    veth = [f"vt{tag}a", f"vt{tag}b"]

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        for ns, _ in nodes:
            ip("netns", "add", ns)
        ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for (ns, addr), dev in zip(nodes, veth):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for ns, _ in nodes:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
    yield nodes
    for ns, _ in nodes:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def start(node, cmd, env, log):
    return subprocess.Popen(
        ["ip", "netns", "exec", node[0], *cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )


def finish(procs, logs, timeout=300):
    codes = [p.wait(timeout=timeout) for p in procs]
    return codes, [open(f).read() for f in logs]


@pytest.mark.drill  # make test: two torchrun nodes below; this one in make drills (CI time)
def test_accelerate_two_nodes_stop_on_usr1_and_resume(tmp_path, digits_dir, cpu_env, two_nodes, smoke_reference):
    run_dir = tmp_path / "run"
    head = two_nodes[0][1]

    def launch(leg):
        logs = [tmp_path / f"{leg}-node{i}.log" for i in range(2)]
        procs = [
            start(
                node,
                accelerate_cmd(nodes=2, procs=1, machine_rank=i, head=head, port=PORT)
                + smoke_overrides(run_dir, digits_dir),
                cpu_env,
                open(log, "w"),
            )
            for i, (node, log) in enumerate(zip(two_nodes, logs))
        ]
        return procs, logs

    procs, logs = launch("first")
    wait_until(lambda: 20 <= last_step(run_dir), 180, "step 20", procs[0])
    rank1 = ranks_of(procs[1].pid)
    assert list(rank1) == [1]  # node 1 runs global rank 1: its machine rank was its own
    rank1[1].send_signal(signal.SIGUSR1)
    codes, out = finish(procs, logs)
    assert "collectives over" in out[0]  # the host name resolves to loopback in a namespace
    assert "stopped after step" in out[0] and "(SIGUSR1)" in out[0], out[0][-3000:]
    assert all(code != 0 for code in codes)  # stopped, not finished
    step = int(out[0].split("stopped after step ")[1].split()[0])
    assert 20 <= step < STEPS
    assert all("exitcode  : 75" in o for o in out)  # each node's rank: stopped, with a checkpoint
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    assert (ckpt / "COMPLETE.json").exists()
    assert sorted(p.name for p in ckpt.glob("data-rank*.json")) == ["data-rank0.json", "data-rank1.json"]
    assert not (run_dir / "final_metrics.json").exists()

    procs, logs = launch("second")
    codes, out = finish(procs, logs)
    assert codes == [0, 0], out[0][-3000:] + out[1][-3000:]
    assert f"step-{step} (step {step}, exact)" in out[0]
    assert_matches_reference(run_dir, smoke_reference)


def test_torchrun_two_nodes_resume_a_killed_rank_by_themselves(
    tmp_path, digits_dir, cpu_env, two_nodes, smoke_reference
):
    run_dir = tmp_path / "run"
    endpoint = f"{two_nodes[0][1]}:{PORT}"
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [
        start(
            node,
            torchrun_cmd(nodes=2, procs=1, endpoint=endpoint, max_restarts=1, is_host=(i == 0), local_addr=node[1])
            + smoke_overrides(run_dir, digits_dir),
            cpu_env,
            open(log, "w"),
        )
        for i, (node, log) in enumerate(zip(two_nodes, logs))
    ]

    def done():
        return (run_dir / "checkpoints/step-80/COMPLETE.json").exists() and last_step(run_dir) >= 90

    wait_until(done, 180, "checkpoint 80 and step 90", procs[0])
    ranks = ranks_of(procs[1].pid)
    assert len(ranks) == 1
    next(iter(ranks.values())).kill()  # SIGKILL node 1's rank
    codes, out = finish(procs, logs)
    assert codes == [0, 0], out[0][-3000:] + out[1][-3000:]
    assert "step-80 (step 80, exact)" in out[0] + out[1]
    assert_matches_reference(run_dir, smoke_reference)
