"""What the framework costs per step: Tributary's Trainer against a bare PyTorch loop.

Both loops step the same model (the recipe's workload), on the same batches, with the same
AdamW, LR schedule and clipping, in the same processes. They run side by side and take
turns step by step: after each of our optimizer steps, the workload's per-step hook runs
one step of the bare loop. Whatever else the machine does then falls on both alike (this
2-core machine drifts by 20-30% over seconds, which sequential runs cannot tell from the
loops). The bare loop is what one writes by hand: `loss.backward(); clip; opt.step();
zero_grad; sched.step()`, and `loss.item()` printed by rank 0 every log interval. Ours is
`Trainer.fit()` with logging at the trainer's default interval (TensorBoard,
metrics.jsonl, progress bar, the log step's all-reduce), without eval, sample or
checkpoint steps (the bare loop has none).

The batches: by default the first 64 of the recipe's stream, decoded once and cycled from
memory by both loops, so that the comparison is of the loops and not of a PNG decoder
sharing 2 cores (the stream has its own benchmarks); `--data stream` feeds both from the
recipe's StreamLoader instead.

Backends, each at 1 and 2 processes (torchrun, gloo on CPU, NCCL on GPUs):
  accelerate  ours: trainer.backend=accelerate (DDP)   bare: torch DDP (no wrapper at 1)
  deepspeed   ours: trainer.backend=deepspeed, ZeRO-2  bare: a deepspeed.initialize engine
              with the same DeepSpeed config, stepped by engine.backward/engine.step

Step time: our step is the time from the end of a bare step to our next hook call (it holds
our log steps); the bare step is the hook's bare step. On CUDA each clock read waits for the
device (torch.cuda.synchronize), so each loop is charged its own GPU time. The durations
are averaged over windows of `log_every` steps (each window holds one of our log steps)
after warm-up; `ratio` is the median window of ours over the median window of the bare
loop, and `paired_ratio` the median of the window-by-window ratios.

    python -m benchmarks.overhead [--quick] [--recipes made,lm] [--nprocs 1,2]

One JSON line per (recipe, backend, nprocs); the last line is the summary
{"ratio_accelerate": ..., "ratio_deepspeed": ...}: the largest ours/bare ratio of each
backend over recipes and process counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"made": "configs/autoregressive/made.yaml", "lm": "configs/lm/causal_1k.yaml"}
# steps per round (full, quick): the smoke step is ~1 ms, the LM step ~0.2 s on 2 CPU cores
STEPS = {"made": (1000, 300), "lm": (60, 30)}
WARMUP = {"made": 100, "lm": 10}


# ---------------------------------------------------------------- the worker (one rank)
def _config(recipe: str, backend: str, run_dir: Path, steps: int, log_every: int = 0, overrides=()):
    from launch.recipes import load_recipe

    cfg = load_recipe(
        ROOT / RECIPES[recipe],
        [
            f"run.dir={run_dir}",
            f"trainer.max_steps={steps}",
            "trainer.eval_every=0",
            "trainer.sample_every=0",
            "trainer.checkpoint_every=0",
            f"trainer.backend={backend}",
            "trainer.deepspeed.zero_stage=2",
            f"optim.warmup_steps={min(10, steps // 2)}",
            *overrides,
        ],
    )
    cfg.trainer.log_every = log_every or type(cfg.trainer)().log_every  # default: the trainer's default
    for split in (cfg.data.val, cfg.data.test):  # no eval at the end either
        split.urls = ""
    return cfg


class MemoryLoader:
    """The first `n` batches of a StreamLoader, cycled: the loop-facing side of one."""

    def __init__(self, loader, n: int = 64):
        self.inner, self.batches = loader, [next(loader) for _ in range(n)]
        self.samples_seen, self.epoch, self.i = 0, None, 0
        self.per_batch = loader.stream.batch_size * loader.stream.world_size

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        self.samples_seen += self.per_batch
        return self.batches[self.i % len(self.batches)]

    def stats(self) -> dict:
        return {}

    def state_dict(self):
        return self.inner.state_dict()


def _device():
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def sync(device) -> None:
    """Wait for the work queued on `device`: a CUDA step returns once its kernels are queued,
    so a clock read without this would charge one loop's GPU time to the other."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """The hand-written loop, one step per call (`step()` returns when the step is done)."""

    def __init__(self, cfg, kind: str, data: str):
        import functools

        import torch
        import torch.distributed as dist

        from models.registry import build_workload
        from trainer.loop import build_loader, build_optimizer, lr_factor, seed_all

        self.rank, world = dist.get_rank(), dist.get_world_size()
        self.cfg, self.kind, self.device, self.n = cfg, kind, _device(), 0
        t = cfg.trainer
        self.workload = build_workload(cfg.model)
        seed_all(t.seed)
        model = self.workload.build_model().to(self.device)
        optimizer = build_optimizer(model, cfg.optim)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            functools.partial(
                lr_factor,
                warmup=cfg.optim.warmup_steps,
                total=t.max_steps,
                schedule=cfg.optim.schedule,
                min_ratio=cfg.optim.min_lr_ratio,
            ),
        )
        if kind == "deepspeed":
            import deepspeed

            from trainer.backends.deepspeed import deepspeed_config

            model, optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(t, cfg.data.batch_size)
            )
        elif world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        self.model, self.optimizer = model, optimizer
        loader = build_loader(cfg, self.workload, self.rank, world)
        self.loader = MemoryLoader(loader) if data == "memory" else loader

    def step(self) -> None:
        import torch
        from accelerate.utils import send_to_device

        t = self.cfg.trainer
        self.n += 1
        batch = send_to_device(next(self.loader), self.device)
        loss = self.workload.training_loss(self.model, batch)
        if self.kind == "deepspeed":
            self.model.backward(loss)
            self.model.step()  # clipping is the engine's
        else:
            loss.backward()
            if t.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.sched.step()
        if self.n % t.log_every == 0 and self.rank == 0:
            print(f"step {self.n} loss {loss.item():.4f}", file=sys.stderr)


def paired_run(cfg, kind: str, data: str) -> tuple[list[float], list[float]]:
    """Our Trainer.fit(), with one bare step run right after each of our steps (in the
    workload's per-step hook): the two loops alternate step by step, so that whatever
    else the machine does falls on both alike. Returns each loop's step durations."""
    from models.registry import build_workload
    from trainer.backends import make_backend
    from trainer.loop import Trainer

    class MemoryTrainer(Trainer):
        def _build(self):
            super()._build()
            self.loader = MemoryLoader(self.loader)

    bare = BareLoop(cfg, kind, data)
    workload = build_workload(cfg.model)
    ours_s: list[float] = []
    bare_s: list[float] = []
    workload.on_step_end = paired_hook(workload.on_step_end, bare, ours_s, bare_s)
    backend = make_backend(cfg)
    assert backend.world_size == int(os.environ.get("WORLD_SIZE", 1)), "set ACCELERATE_USE_CPU=1 on a CPU machine"
    (MemoryTrainer if data == "memory" else Trainer)(cfg, workload, backend).fit()
    return ours_s, bare_s[1:]


def paired_hook(hook, bare, ours_s: list[float], bare_s: list[float]):
    """`hook` followed by one timed bare step: the per-step hook that makes the loops take
    turns. Appends our step's duration (from the end of the last bare step: our step, our
    log) to `ours_s` and the bare step's to `bare_s`; the device is idle at each clock read."""
    last = [0.0]

    def paired(net, step):  # called by our loop after each optimizer step, on every rank
        hook(net, step)
        sync(bare.device)
        t0 = time.perf_counter()
        if step > 1:
            ours_s.append(t0 - last[0])
        bare.step()
        sync(bare.device)
        last[0] = time.perf_counter()
        bare_s.append(last[0] - t0)

    return paired


def windows(durations: list[float], warmup: int, width: int) -> list[float]:
    """Mean step time of consecutive `width`-step windows after `warmup` steps."""
    d = durations[warmup:]
    return [sum(d[i : i + width]) / width for i in range(0, len(d) - width + 1, width)]


def worker(args) -> None:
    import torch.distributed as dist

    from trainer.config import TrainerConfig

    if not dist.is_initialized():
        dist.init_process_group("nccl" if _device().type == "cuda" else "gloo")
    rank = dist.get_rank()
    steps = STEPS[args.recipe][1 if args.quick else 0]
    width = args.log_every if 0 < args.log_every <= 100 else TrainerConfig().log_every  # a log step per window
    ours_w: list[float] = []
    bare_w: list[float] = []
    for r in range(args.rounds):
        cfg = _config(args.recipe, args.backend, Path(args.scratch) / f"round{r}", steps, args.log_every, args.set)
        dist.barrier()
        ours, bare = paired_run(cfg, args.backend, args.data)
        ours_w += windows(ours, WARMUP[args.recipe], width)
        bare_w += windows(bare, WARMUP[args.recipe], width)
    if rank == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "bare_s": statistics.median(bare_w),
                    "ours_s": statistics.median(ours_w),
                    "paired_ratio": statistics.median(o / b for o, b in zip(ours_w, bare_w)),
                    "windows": len(bare_w),
                    "window_steps": width,
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- the driver
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_one(
    recipe: str, backend: str, nproc: int, rounds: int, quick: bool, data: str, log_every: int = 0, overrides=()
) -> dict:
    """One (recipe, backend, nprocs) measurement; `overrides` (`a.b=c`) change the recipe (its
    data, its size) for both loops."""
    scratch = Path(tempfile.mkdtemp(prefix="tributary-overhead-"))
    out = scratch / "result.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "benchmarks.overhead",
        "--worker",
        "--recipe",
        recipe,
        "--backend",
        backend,
        "--rounds",
        str(rounds),
        "--data",
        data,
        "--log-every",
        str(log_every),
        "--scratch",
        str(scratch),
        "--out",
        str(out),
    ] + (["--quick"] if quick else [])
    cmd += [f"--set={o}" for o in overrides]
    env = dict(
        os.environ,
        ACCELERATE_USE_CPU=os.environ.get("ACCELERATE_USE_CPU", "0" if _has_cuda() else "1"),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc))),
    )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise SystemExit(f"{recipe}/{backend}/{nproc}: worker failed\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "recipe": recipe,
        "backend": backend,
        "nprocs": nproc,
        "data": data,
        "bare_step_ms": round(res["bare_s"] * 1e3, 3),
        "ours_step_ms": round(res["ours_s"] * 1e3, 3),
        "ratio": round(res["ours_s"] / res["bare_s"], 4),
        "paired_ratio": round(res["paired_ratio"], 4),
        "overhead_us_per_step": round((res["ours_s"] - res["bare_s"]) * 1e6, 1),
        "windows": res["windows"],
        "window_steps": res["window_steps"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    p.add_argument("--recipes", default="made,lm")
    p.add_argument("--backends", default="accelerate,deepspeed")
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--rounds", type=int, default=0, help="fresh runs per configuration (default 2; quick 1)")
    p.add_argument(
        "--data",
        choices=("memory", "stream"),
        default="memory",
        help="batches cycled from memory (default) or the recipe's stream",
    )
    p.add_argument(
        "--log-every", type=int, default=0, help="the trainer's log interval (default: TrainerConfig's default, 10)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    rounds = args.rounds or (1 if args.quick else 2)
    ratios: dict[str, list[float]] = {}
    for recipe in args.recipes.split(","):
        for backend in args.backends.split(","):
            for nproc in (int(n) for n in args.nprocs.split(",")):
                row = run_one(recipe, backend, nproc, rounds, args.quick, args.data, args.log_every)
                print(json.dumps(row), flush=True)
                ratios.setdefault(backend, []).append(row["ratio"])
    print(json.dumps({f"ratio_{b}": max(r) for b, r in ratios.items()}))


if __name__ == "__main__":
    main()
