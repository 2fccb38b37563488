"""Shared pieces of the launch tests: one smoke recipe, its uninterrupted 2-rank reference,
and ways to find and signal the ranks of a running launch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE = str(ROOT / "configs/autoregressive/made.yaml")
STEPS = 200


def smoke_overrides(run_dir, digits_dir, *more) -> list[str]:
    """The default smoke recipe, small: every step logged, a checkpoint every 40 steps."""
    return [
        f"run.dir={run_dir}",
        f"data.train.urls={digits_dir}/train",
        f"data.val.urls={digits_dir}/val",
        f"data.test.urls={digits_dir}/test",
        "model.hidden=[64]",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every=1",
        "trainer.checkpoint_every=40",
        "trainer.eval_every=0",
        "trainer.progress_bar=false",
        "optim.warmup_steps=5",
        "data.shuffle_buffer=64",
        *more,
    ]


def accelerate_cmd(nodes=1, procs=2, machine_rank=0, head="127.0.0.1", port=0) -> list[str]:
    return [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_machines",
        str(nodes),
        "--num_processes",
        str(nodes * procs),
        "--machine_rank",
        str(machine_rank),
        "--main_process_ip",
        head,
        "--main_process_port",
        str(port),
        "--rdzv_backend",
        "static",
        "--same_network",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "launch.train",
        "--config",
        RECIPE,
    ]


def torchrun_cmd(nodes=1, procs=2, endpoint="127.0.0.1:0", max_restarts=0, is_host=None, local_addr=None) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nodes),
        "--nproc_per_node",
        str(procs),
        "--max_restarts",
        str(max_restarts),
    ]
    if nodes == 1 and endpoint.endswith(":0"):
        cmd += ["--standalone"]
    else:
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "tributary-test"]
    if is_host is not None:
        cmd += ["--rdzv_conf", f"is_host={int(is_host)}"]
    if local_addr:
        cmd += ["--local_addr", local_addr]
    return cmd + ["-m", "launch.train", "--config", RECIPE]


def train_records(run_dir) -> list[dict]:
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


def last_step(run_dir) -> int:
    m = Path(run_dir) / "metrics.jsonl"
    if not m.exists():
        return 0
    recs = read_jsonl(m)[-3:]
    return max((r.get("step", 0) for r in recs), default=0)


def ranks_of(pid) -> dict[int, psutil.Process]:
    """The training processes under a launcher (or a SLURM step), by RANK."""
    candidates = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "launch.train" in " ".join(p.cmdline()) and "RANK" in p.environ():
                candidates[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    # a rank's data-loader workers share its command line and environment: skip them
    return {int(p.environ()["RANK"]): p for p in candidates.values() if p.ppid() not in candidates}


def wait_until(predicate, timeout, what, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def assert_matches_reference(run_dir, reference) -> None:
    """Every step logged once, in order, with the uninterrupted run's loss, LR and grad
    norm, bit for bit; and the same final metrics."""
    ref, got = train_records(reference), train_records(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
    assert json.loads((Path(run_dir) / "final_metrics.json").read_text()) == json.loads(
        (Path(reference) / "final_metrics.json").read_text()
    )


def run_ok(cmd, env, timeout=300, cwd=ROOT) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-8000:]
    return out.stdout + out.stderr
