"""What the per-step stop vote (trainer/preempt.py) costs, next to a training step.

    .venv/bin/python -m benchmarks.stop_vote [--ranks 2] [--iters 2000] [--hidden 512]

Starts --ranks CPU processes over gloo (one thread each). Each times --iters votes held
every step (`StopAgreement(check_every=1).poll`: one MAX all-reduce), then DDP steps of
configs/autoregressive/made.yaml's model (model.hidden=[--hidden], batch 64, AdamW)
without a vote and with the default vote (about once a second), interleaved three times,
best mean of each. Prints one JSON object: the vote's median and p99 in microseconds, the
two step times and their ratio, how many votes the default held, and what a vote at every
step would cost as a share of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, iters: int, hidden: int, out) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from launch.recipes import load_recipe
    from models.registry import build_workload
    from trainer.preempt import StopAgreement

    every_step = StopAgreement(check_every=1)
    votes = []
    for i in range(iters + 50):
        t = time.perf_counter()
        every_step.poll(i + 1)
        if i >= 50:
            votes.append(time.perf_counter() - t)
    every_step.close()

    cfg = load_recipe("configs/autoregressive/made.yaml", [f"model.hidden=[{hidden}]"])
    wl = build_workload(cfg.model)
    net = torch.nn.parallel.DistributedDataParallel(wl.build_model())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    batch = (torch.rand(64, 64) > 0.5).float()

    def steps(stopper, n):
        times = []
        for i in range(n):
            t = time.perf_counter()
            loss = wl.training_loss(net, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if stopper is not None:
                stopper.poll(i + 1)
            times.append(time.perf_counter() - t)
        return sum(times[5:]) / len(times[5:])

    n = max(20, iters // 4)
    auto = StopAgreement()  # the default: about one vote a second
    plain, voted = [], []
    for _ in range(3):  # interleaved, so drift hits both alike
        plain.append(steps(None, n))
        voted.append(steps(auto, n))
    auto.close()
    if rank == 0:
        votes.sort()
        out.put(
            {
                "ranks": world,
                "hidden": hidden,
                "vote_median_us": round(statistics.median(votes) * 1e6, 1),
                "vote_p99_us": round(votes[int(0.99 * len(votes))] * 1e6, 1),
                "step_ms_without_votes": round(min(plain) * 1e3, 3),
                "step_ms_with_auto_votes": round(min(voted) * 1e3, 3),
                "auto_overhead_ratio": round(min(voted) / min(plain), 4),
                "auto_votes_held": auto.votes,
                "auto_steps": 3 * n,
                "every_step_vote_share_of_step": round(statistics.median(votes) / min(plain), 4),
            }
        )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=512, help="512: the recipe; the launch tests use 64")
    a = p.parse_args()
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(
        worker, args=(a.ranks, free_port(), a.iters, a.hidden, out), nprocs=a.ranks, start_method="spawn"
    )
    print(json.dumps(out.get()))


if __name__ == "__main__":
    main()
