"""Bits per byte of softmax vs FLASH vs linear attention at 4k context, small models on
the embedded corpus: after the same number of steps, and after the same wall-clock budget.

    .venv/bin/python -m benchmarks.lm_quality [--steps 150] [--budget-s 120] [--data data/lm/stdlib-4k]
        [--kinds softmax,flash,linear] [--nproc 1]

Every run is the real trainer (`launch.train` on configs/lm/causal_4k.yaml) with only the
attention kind and sizes changed; softmax and linear models get `depth` blocks, FLASH
models 2x as many (a GAU replaces attention + MLP; parameter counts are reported so the
comparison can be judged). The learning rate is constant after warm-up, so runs of any
length are comparable. The same-steps runs stop at `--steps`; the same-budget runs get
`trainer.max_time=--budget-s` seconds of training time (eval excluded) and no step cap.
Validation bits per byte are the final `val/bits_per_byte` over the whole validation split.
Earlier lines are per-run JSON; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parent.parent


def train(kind: str, run_dir: Path, args, *extra: str) -> dict:
    depth = args.depth * (2 if kind.startswith("flash") else 1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.nproc),
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/lm/causal_4k.yaml"),
        f"run.dir={run_dir}",
        f"model.attention={kind}",
        f"model.dim={args.dim}",
        f"model.depth={depth}",
        f"model.heads={args.heads}",
        f"model.qk_dim={args.qk_dim}",
        "model.seq_len=4096",
        f"data.train.urls={args.data}/train",
        f"data.val.urls={args.data}/val",
        "data.test.urls=''",
        f"data.batch_size={args.batch}",
        "trainer.log_every=10",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress_bar=false",
        f"optim.warmup_steps={args.warmup}",
        f"optim.lr={args.lr}",
        "optim.schedule=constant",
        *extra,
    ]
    t0 = time.monotonic()
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(__import__("os").environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(args.threads)),
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind}: exit {out.returncode}\n{out.stderr[-3000:]}")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train/loss"] for r in records if "train/loss" in r]
    from trainer.sharded import model_tensors, read_metadata

    specs = model_tensors(read_metadata(run_dir / "checkpoints" / f"step-{final['step']}" / "state"))
    params = sum(m.size.numel() for m in specs.values())
    return {
        "attention": kind,
        "depth": depth,
        "params": params,
        "steps": final["step"],
        "val_bits_per_byte": final["val/bits_per_byte"],
        "last_train_bits_per_byte": train_losses[-1],
        "wall_s": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="softmax,flash,linear")
    ap.add_argument("--data", default="data/lm/stdlib-4k", help="shards built with --seq-len 4096")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2, help="softmax/linear blocks; FLASH gets 2x")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--qk-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (Path(args.data) / "train" / "manifest.json").exists():
        sys.exit(f"{args.data}: no shards; build them with `make data-lm`")

    kinds = args.kinds.split(",")
    result: dict = {"same_steps": {}, "same_budget": {}, "steps": args.steps, "budget_s": args.budget_s}
    with tempfile.TemporaryDirectory(prefix="lm_quality_") as tmp:
        for kind in kinds:
            r = train(kind, Path(tmp) / f"steps-{kind}", args, f"trainer.max_steps={args.steps}")
            print(json.dumps({"mode": "same_steps", **r}), flush=True)
            result["same_steps"][kind] = r
        for kind in kinds:
            r = train(
                kind,
                Path(tmp) / f"budget-{kind}",
                args,
                "trainer.max_steps=1000000",
                f"trainer.max_time={args.budget_s}",
            )
            print(json.dumps({"mode": "same_budget", **r}), flush=True)
            result["same_budget"][kind] = r
    for mode in ("same_steps", "same_budget"):
        ranked = sorted(result[mode], key=lambda k: result[mode][k]["val_bits_per_byte"])
        result[f"{mode}_ranking"] = ranked
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
