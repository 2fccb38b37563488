"""MFU and throughput of every workload's recipe, as the trainer logs them to TensorBoard.

Each recipe runs as a real `python -m launch.train` for a few dozen steps (one process;
eval, samples and checkpoints only at the end, outside the timed windows) and its
metrics.jsonl is read back: the median over the log windows after the first of
`perf/mfu`, `perf/tflops_per_rank`, `train/samples_per_s` and the workload's own unit
(`perf/tokens_per_s`, `perf/images_per_s`). The FLOPs formula and the peak are the
trainer's (models/flops.py; the start of each run prints the peak and where it came from).

    python -m benchmarks.mfu [--recipes made,lm_1k] [--steps-scale 1.0]

One JSON line per recipe, then {"mfu": {recipe: value, ...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
# name: (recipe, steps, log_every, extra overrides); the data each needs comes from `make data*`
RECIPES = {
    "made": ("configs/autoregressive/made.yaml", 400, 50, []),
    "nade": ("configs/autoregressive/nade.yaml", 400, 50, []),
    "fvsbn": ("configs/autoregressive/fvsbn.yaml", 400, 50, []),
    "lm_1k_softmax": ("configs/lm/causal_1k.yaml", 30, 5, []),
    "lm_1k_flash": ("configs/lm/causal_1k.yaml", 30, 5, ["model.attention=flash"]),
    "lm_4k_linear": ("configs/lm/causal_4k.yaml", 20, 4, ["model.attention=linear"]),
    "lm_masked_4k": ("configs/lm/masked_4k.yaml", 20, 4, []),
    "sd_tiny_unet": ("configs/sd/tiny.yaml", 60, 10, []),
    "sd_tiny_vae": ("configs/sd/tiny_vae.yaml", 60, 10, []),
    "detr": ("configs/detr/shapes.yaml", 30, 5, []),
    "oadtr": ("configs/oadtr/oadtr.yaml", 100, 20, []),
    "score_vp_digits": ("configs/score/vp_digits.yaml", 200, 40, []),
}


def train_args(recipe: str, run_dir: Path, steps: int, log_every: int, extra: list[str]) -> list[str]:
    """`launch.train`'s arguments for a timed run: eval, samples and checkpoints only at the end."""
    return [
        "--config",
        recipe,
        f"run.dir={run_dir}",
        f"trainer.max_steps={steps}",
        f"trainer.log_every={log_every}",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress_bar=false",
        f"optim.warmup_steps={min(10, steps - 1)}",
        *extra,
    ]


def read_run(run_dir: Path, stdout: str) -> dict:
    """The peak the run measured against and the median of each rate over its log windows
    after the first (which holds warm-up)."""
    from trainer.metrics import read_jsonl

    windows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/samples_per_s" in r][1:]
    peak = re.search(r"MFU against (\S+) TFLOP/s per rank \((.*)\)\s*$", stdout, re.M)
    row = {
        "peak_tflops": float(peak.group(1)) if peak else None,
        "peak_from": peak.group(2) if peak else None,
        "windows": len(windows),
    }
    for key in (
        "perf/mfu",
        "perf/tflops_per_rank",
        "train/samples_per_s",
        "perf/tokens_per_s",
        "perf/images_per_s",
        "train/data_wait_frac",
    ):
        values = [r[key] for r in windows if key in r]
        if values:
            row[key] = statistics.median(values)
    if "perf/mfu" not in row:
        row["note"] = next((line for line in stdout.splitlines() if "perf/mfu is not logged" in line), "")
    return row


def run(name: str, scale: float) -> dict:
    recipe, steps, log_every, extra = RECIPES[name]
    steps = max(3 * log_every, int(steps * scale) // log_every * log_every)
    run_dir = Path(tempfile.mkdtemp(prefix=f"tributary-mfu-{name}-"))
    cmd = [sys.executable, "-m", "launch.train", *train_args(recipe, run_dir, steps, log_every, extra)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        if out.returncode != 0:
            return {"recipe": name, "error": out.stderr.strip().splitlines()[-1][:300]}
        row = {"recipe": name, "config": recipe + (" " + " ".join(extra) if extra else ""), "steps": steps}
        row.update(read_run(run_dir, out.stdout))
        return row
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's step count")
    args = p.parse_args(argv)
    mfu = {}
    for name in args.recipes.split(","):
        row = run(name, args.steps_scale)
        print(json.dumps(row), flush=True)
        mfu[name] = row.get("perf/mfu")
    print(json.dumps({"mfu": mfu}))


if __name__ == "__main__":
    main()
