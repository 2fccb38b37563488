"""Throughput at 1 and 2 ranks, and where a 2-rank step's time goes.

Every configuration is a real launch, as users run one: torchrun (its module,
`python -m torch.distributed.run --standalone --nproc_per_node N`) starting
`launch.train` on the recipe, on CPU (ACCELERATE_USE_CPU=1, gloo). Weak scaling: each rank
keeps the recipe's data.batch_size. No eval, sample or checkpoint step runs (the val and
test splits are emptied, so nothing runs after the last step either). The LR warm-up is
shortened to fit the short runs; it changes no step's cost.

Throughput is read from the run's metrics.jsonl: the median, over the log windows after
the first few (warm-up), of `train/samples_per_s` (global, all ranks; the trainer leaves
eval and checkpoint time out of it), `perf/tokens_per_s` for the LM and
`train/data_wait_frac` (the share of the window rank 0 spent waiting for its loader).
Step time = global batch / samples per second.

Runs per recipe (threads = OMP_NUM_THREADS per rank):
  1 rank x 1 thread, 2 ranks x 1 thread   efficiency = sps(2) / (2 x sps(1)): each rank owns one
                                           core, so this compares like with like
  1 rank x 2 threads                       reference: both cores in one process
  2 ranks x 1 thread, nosync               DDP removed (this module's --nosync-worker patches
                                           AccelerateBackend.prepare to return the DDP-wrapped
                                           model's .module): the ranks train independently, the
                                           numbers diverge, only the timing matters

Breakdown of the 2-rank step: communication = 1 - step(nosync) / step(sync), which counts
only the part DDP does not hide behind backward (it all-reduces gradient buckets while
backward runs), with DDP's per-forward buffer broadcast and the wait for the slower rank;
data wait = rank 0's data_wait_frac; compute = the rest (forward, backward, optimizer, logging).
Each rank also has the recipe's loader worker process (data.num_workers=1): at 1 rank it
has the second core to itself, at 2 ranks four processes share two cores.

    python -m benchmarks.scaling [--quick] [--recipes made,lm]   # ~6 min (MADE 1.5, LM 4.5); --quick ~3

One JSON line per (recipe, ranks, threads, variant); then per recipe the efficiency and the
2-rank breakdown; last the summary {"made_efficiency": ..., "lm_efficiency": ...}.
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
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"made": "configs/autoregressive/made.yaml", "lm": "configs/lm/causal_1k.yaml"}
# steps (full, quick), log interval and warm-up windows skipped: the MADE step is ~10-25 ms,
# the LM step ~1-2 s on one core
PLAN = {"made": {"steps": (600, 200), "log_every": 25, "skip": 4}, "lm": {"steps": (36, 12), "log_every": 3, "skip": 2}}
RUNS = [(1, 1, "sync"), (2, 1, "sync"), (2, 1, "nosync"), (1, 2, "sync")]  # ranks, threads, variant


def nosync_worker(argv: list[str]) -> int:
    """launch.train with DDP taken off the model: no gradient all-reduce, no buffer broadcast."""
    from torch.nn.parallel import DistributedDataParallel

    from launch.train import main
    from trainer.backends.accelerate import AccelerateBackend

    prepare = AccelerateBackend.prepare

    def prepare_without_ddp(self, model, optimizer):
        model, optimizer = prepare(self, model, optimizer)
        return (model.module if isinstance(model, DistributedDataParallel) else model), optimizer

    AccelerateBackend.prepare = prepare_without_ddp
    return main(argv)


def launch(recipe: str, ranks: int, threads: int, variant: str, steps: int, run_dir: Path) -> list[dict]:
    """One training run; the log records of its metrics.jsonl."""
    from trainer.metrics import read_jsonl

    entry = ["benchmarks.scaling", "--nosync-worker"] if variant == "nosync" else ["launch.train"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        *entry,
        "--config",
        RECIPES[recipe],
        f"run.dir={run_dir}",
        f"trainer.max_steps={steps}",
        f"optim.warmup_steps={steps // 10}",
        f"trainer.log_every={PLAN[recipe]['log_every']}",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress_bar=false",
        'data.val.urls=""',
        'data.test.urls=""',
    ]  # a bare `key=` reads as None and is refused
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\nfailed ({done.returncode}):\n{done.stderr[-3000:]}")
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/samples_per_s" in r]


def measure(recipe: str, ranks: int, threads: int, variant: str, quick: bool) -> dict:
    from launch.recipes import load_recipe

    plan = PLAN[recipe]
    run_dir = Path(tempfile.mkdtemp(prefix=f"scaling-{recipe}-"))
    try:
        windows = launch(recipe, ranks, threads, variant, plan["steps"][quick], run_dir)[plan["skip"] :]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    def median(key):
        return statistics.median(w[key] for w in windows) if key in windows[0] else None

    sps = median("train/samples_per_s")
    batch = ranks * load_recipe(ROOT / RECIPES[recipe]).data.batch_size
    row = {
        "recipe": recipe,
        "ranks": ranks,
        "threads_per_rank": threads,
        "variant": variant,
        "windows": len(windows),
        "samples_per_s": float(f"{sps:.4g}"),
        "step_ms": round(1000 * batch / sps, 2),
        "data_wait_frac": round(median("train/data_wait_frac"), 3),
    }
    if recipe == "lm":
        row["tokens_per_s"] = round(median("perf/tokens_per_s"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a third of the steps (~3 min)")
    parser.add_argument("--recipes", default="made,lm", help="comma list of: " + ",".join(RECIPES))
    args = parser.parse_args()
    summary = {}
    for recipe in args.recipes.split(","):
        rows = {}
        for ranks, threads, variant in RUNS:
            row = measure(recipe, ranks, threads, variant, args.quick)
            rows[ranks, threads, variant] = row
            print(json.dumps(row), flush=True)
        one, two, nosync = rows[1, 1, "sync"], rows[2, 1, "sync"], rows[2, 1, "nosync"]
        efficiency = two["samples_per_s"] / (2 * one["samples_per_s"])
        comm = 1 - nosync["step_ms"] / two["step_ms"]
        data = two["data_wait_frac"]
        print(
            json.dumps(
                {
                    "recipe": recipe,
                    "efficiency": round(efficiency, 3),
                    "speedup_vs_1rank_2threads": round(two["samples_per_s"] / rows[1, 2, "sync"]["samples_per_s"], 3),
                    "step_ms_2ranks": two["step_ms"],
                    "breakdown_2ranks": {
                        "compute": round(1 - comm - data, 3),
                        "allreduce": round(comm, 3),
                        "data_wait": data,
                    },
                    "note": "allreduce = 1 - step(nosync)/step(sync): the DDP communication not overlapped with "
                    "backward (gradient buckets, buffer broadcast, waiting for the slower rank)",
                }
            ),
            flush=True,
        )
        summary[f"{recipe}_efficiency"] = round(efficiency, 3)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--nosync-worker"]:
        sys.exit(nosync_worker(sys.argv[2:]))
    main()
