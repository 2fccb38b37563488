"""Forward+backward time and peak memory of one causal block per attention kind, against
sequence length; the fitted log-log slope; model FLOPs per token (for MFU).

    .venv/bin/python -m benchmarks.attention_scaling [--kinds softmax,linear,flash]
        [--tokens 1024,2048,4096,8192,16384] [--max-tokens 16384] [--dim 512] [--reps 3]
        [--peak-flops 9.9e14]

Each (kind, tokens) point runs in a fresh process (`--point KIND TOKENS`), so its peak
memory is its own: on CUDA `torch.cuda.max_memory_allocated`, on CPU the growth of peak
RSS over the process's RSS just before the first forward (inputs and weights included).
Time is the median of `reps` forward+backward passes after one warm-up, batch 1. The
slope is the least-squares slope of log(time) on log(tokens) over the points from 2k up.
`achieved_flops` divides the model FLOPs of one fwd+bwd (3x the forward's matmul FLOPs, as
counted by `attention_flops_per_token`) by the time; with `--peak-flops` MFU is that over
the device's peak. Earlier lines are per-point JSON; the last line is one JSON object
with `rows` and `slope`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("softmax", "linear", "flash")
TOKENS = (1024, 2048, 4096, 8192, 16384)


def point(kind: str, tokens: int, args) -> dict:
    import psutil
    import torch

    from models.lm.layers import attention_flops_per_token, make_block

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    block = make_block(
        kind,
        dim=args.dim,
        heads=args.heads,
        causal=True,
        chunk_size=args.chunk_size,
        expansion=args.expansion,
        qk_dim=args.qk_dim,
        mlp_ratio=args.mlp_ratio,
    ).to(device)
    x = torch.randn(1, tokens, args.dim, device=device, requires_grad=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    base_rss = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.reps + 1):
        sync()
        t0 = time.perf_counter()
        block(x).square().mean().backward()
        sync()
        if i:  # the first pass warms up (allocations, kernel choice)
            times.append(time.perf_counter() - t0)
        x.grad = None
        block.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    flops_tok = 3 * attention_flops_per_token(
        kind,
        dim=args.dim,
        heads=args.heads,
        tokens=tokens,
        chunk_size=args.chunk_size,
        expansion=args.expansion,
        qk_dim=args.qk_dim,
        mlp_ratio=args.mlp_ratio,
        causal=True,
    )
    fwd_bwd = statistics.median(times)
    row = {
        "attention": kind,
        "tokens": tokens,
        "fwd_bwd_s": fwd_bwd,
        "peak_bytes": int(peak),
        "times_s": [round(t, 4) for t in times],
        "flops_per_token": flops_tok,
        "achieved_flops": flops_tok * tokens / fwd_bwd,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if args.peak_flops:
        row["mfu"] = row["achieved_flops"] / args.peak_flops
    return row


def slope(rows: list[dict], kind: str, lo: int = 2048) -> float | None:
    pts = [
        (math.log(r["tokens"]), math.log(r["fwd_bwd_s"])) for r in rows if r["attention"] == kind and r["tokens"] >= lo
    ]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--point", nargs=2, metavar=("KIND", "TOKENS"))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--max-tokens", type=int, default=max(TOKENS), help="stop early (a quick run)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--expansion", type=int, default=2)
    ap.add_argument("--qk-dim", type=int, default=128)
    ap.add_argument("--mlp-ratio", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--peak-flops", type=float, help="the device's peak FLOP/s, for MFU")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per point")
    args = ap.parse_args()
    if args.point:
        print(json.dumps(point(args.point[0], int(args.point[1]), args)), flush=True)
        return

    passthrough = [
        f"--dim={args.dim}",
        f"--heads={args.heads}",
        f"--chunk-size={args.chunk_size}",
        f"--expansion={args.expansion}",
        f"--qk-dim={args.qk_dim}",
        f"--mlp-ratio={args.mlp_ratio}",
        f"--reps={args.reps}",
    ]
    passthrough += [f"--device={args.device}"] if args.device else []
    passthrough += [f"--peak-flops={args.peak_flops}"] if args.peak_flops else []
    rows = []
    for kind in args.kinds.split(","):
        for tokens in [int(t) for t in args.tokens.split(",") if int(t) <= args.max_tokens]:
            cmd = [sys.executable, "-m", "benchmarks.attention_scaling", "--point", kind, str(tokens), *passthrough]
            out = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=args.timeout,
                cwd=Path(__file__).resolve().parent.parent,
                env=dict(os.environ),
            )
            if out.returncode != 0:
                print(json.dumps({"attention": kind, "tokens": tokens, "error": out.stderr[-2000:]}), flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    kinds = args.kinds.split(",")
    summary = {
        "rows": [
            {
                k: r[k]
                for k in ("attention", "tokens", "fwd_bwd_s", "peak_bytes", "flops_per_token", "achieved_flops")
                + (("mfu",) if "mfu" in r else ())
            }
            for r in rows
        ],
        "slope": {k: slope(rows, k) for k in kinds},
        "width": args.dim,
    }
    longest = max((r["tokens"] for r in rows), default=None)
    at = {r["attention"]: r["fwd_bwd_s"] for r in rows if r["tokens"] == longest}
    if "softmax" in at and "flash" in at:
        summary[f"softmax_over_flash_at_{longest}"] = at["softmax"] / at["flash"]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
