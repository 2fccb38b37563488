"""Bits per byte of softmax vs FLASH vs linear attention at 4k context, small models on
the embedded corpus: after the same number of steps, and after the same wall-clock budget;
and, with --versus-bytes, byte-level against subword (BPE) tokens at the same budget.

    .venv/bin/python -m benchmarks.lm_quality [--steps 150] [--budget-s 120] [--data data/lm/stdlib-4k]
        [--kinds softmax,flash,linear] [--nproc 1]
    .venv/bin/python -m benchmarks.lm_quality --data data/lm/bpe-4k --tokenizer data/lm/bpe/tokenizer.json \
        --versus-bytes data/lm/stdlib-4k [--steps 0]

Every run is the real trainer (`launch.train` on configs/lm/causal_4k.yaml) with only the
attention kind, sizes and data changed. Softmax and linear models get `depth` blocks; FLASH
models the depth whose parameter count is nearest softmax's (a GAU replaces attention + MLP,
so about twice as many); the counts are reported. With --tokenizer the models read subword
windows, and the embedding and head are the vocabulary's size (a byte model's are 257 rows), so
at this width a BPE model has more parameters than its byte twin: the byte-vs-BPE rows compare
equal compute (the same blocks, context in tokens and training time), not equal parameters.
The learning rate is constant after warm-up, so runs of any length are comparable. The
same-steps runs stop at `--steps` (0 skips them); the same-budget runs get
`trainer.max_time=--budget-s` seconds of training time (eval excluded) and no step cap.
Bits per byte are the final `val/` and `test/bits_per_byte` over the whole split (with subword
tokens: the summed NLL over the bytes of text the predicted tokens cover, so both kinds of
model are measured on the same text). Earlier lines are per-run JSON; the last line is one
JSON object.
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


def model_overrides(kind: str, depth: int, args, tokenizer: str) -> list[str]:
    return [
        f"model.attention={kind}",
        f"model.dim={args.dim}",
        f"model.depth={depth}",
        f"model.heads={args.heads}",
        f"model.qk_dim={args.qk_dim}",
        "model.seq_len=4096",
        *([f"model.tokenizer={tokenizer}"] if tokenizer else []),
    ]


def param_count(kind: str, depth: int, args, tokenizer: str) -> int:
    """Parameters of the model a run would build, counted on the meta device."""
    import torch

    from launch.recipes import load_recipe
    from models.registry import build_workload

    cfg = load_recipe(
        str(ROOT / "configs/lm/causal_4k.yaml"),
        ["run.dir=/nonexistent", *model_overrides(kind, depth, args, tokenizer)],
    )
    with torch.device("meta"):
        model = build_workload(cfg.model).build_model()
    return sum(p.numel() for p in model.parameters())


def matched_depth(kind: str, args, tokenizer: str) -> int:
    """`args.depth` for softmax and linear; for FLASH the depth nearest softmax's parameter count."""
    if not kind.startswith("flash"):
        return args.depth
    target = param_count("softmax", args.depth, args, tokenizer)
    return min(range(1, 4 * args.depth + 1), key=lambda d: abs(param_count(kind, d, args, tokenizer) - target))


def train(kind: str, run_dir: Path, args, *extra: str, data: str, tokenizer: str = "") -> dict:
    depth = matched_depth(kind, args, tokenizer)
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
        *model_overrides(kind, depth, args, tokenizer),
        f"data.train.urls={data}/train",
        f"data.val.urls={data}/val",
        f"data.test.urls={data}/test",
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
        "tokens": "bpe" if tokenizer else "bytes",
        "depth": depth,
        "params": params,
        "steps": final["step"],
        "val_bits_per_byte": final["val/bits_per_byte"],
        "test_bits_per_byte": final.get("test/bits_per_byte"),
        # the training loss is bits per predicted token: bytes for a byte model
        "last_train_loss": train_losses[-1],
        "wall_s": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="softmax,flash,linear")
    ap.add_argument("--data", default="data/lm/stdlib-4k", help="shards built with --seq-len 4096")
    ap.add_argument("--tokenizer", default="", help="the tokenizer.json --data was built with (subword windows)")
    ap.add_argument(
        "--versus-bytes",
        default="",
        metavar="BYTE_DATA",
        help="byte windows of the same corpus (--seq-len 4096): train --versus-kinds on them at the same budget",
    )
    ap.add_argument("--versus-kinds", default="softmax,flash")
    ap.add_argument("--steps", type=int, default=150, help="0: no same-steps runs")
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2, help="softmax/linear blocks; FLASH gets the depth of equal params")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--qk-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for data in filter(None, (args.data, args.versus_bytes)):
        if not (Path(data) / "train" / "manifest.json").exists():
            sys.exit(f"{data}: no shards; build them with `make data-lm` (bytes) or `make data-lm-bpe` (BPE)")

    kinds = args.kinds.split(",")
    tokens = "bpe" if args.tokenizer else "bytes"
    result: dict = {
        "tokens": tokens,
        "same_steps": {},
        "same_budget": {},
        "steps": args.steps,
        "budget_s": args.budget_s,
    }
    budget = ["trainer.max_steps=1000000", f"trainer.max_time={args.budget_s}"]
    with tempfile.TemporaryDirectory(prefix="lm_quality_") as tmp:
        for kind in kinds if args.steps else ():
            r = train(
                kind,
                Path(tmp) / f"steps-{kind}",
                args,
                f"trainer.max_steps={args.steps}",
                data=args.data,
                tokenizer=args.tokenizer,
            )
            print(json.dumps({"mode": "same_steps", **r}), flush=True)
            result["same_steps"][kind] = r
        for kind in kinds:
            r = train(kind, Path(tmp) / f"budget-{kind}", args, *budget, data=args.data, tokenizer=args.tokenizer)
            print(json.dumps({"mode": "same_budget", **r}), flush=True)
            result["same_budget"][kind] = r
        if args.versus_bytes:
            result["bytes_vs_bpe"] = {}
            for kind in args.versus_kinds.split(","):
                r = train(kind, Path(tmp) / f"bytes-{kind}", args, *budget, data=args.versus_bytes)
                print(json.dumps({"mode": "same_budget_bytes", **r}), flush=True)
                theirs = result["same_budget"].get(kind) or train(
                    kind, Path(tmp) / f"bpe-{kind}", args, *budget, data=args.data, tokenizer=args.tokenizer
                )
                result["bytes_vs_bpe"][kind] = {
                    "bytes_test_bits_per_byte": r["test_bits_per_byte"],
                    "bpe_test_bits_per_byte": theirs["test_bits_per_byte"],
                    "bytes_params": r["params"],
                    "bpe_params": theirs["params"],
                }
    for mode in ("same_steps", "same_budget"):
        result[f"{mode}_ranking"] = sorted(result[mode], key=lambda k: result[mode][k]["test_bits_per_byte"])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
