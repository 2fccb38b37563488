"""LoRA against full fine-tuning of a Stable Diffusion folder: trainable parameters, checkpoint
size, step time and peak memory, one process per measurement; and with --modes, the same under
bf16 autocast with the frozen parts in bf16 (model.frozen_dtype: auto) or kept fp32.

    .venv/bin/python -m benchmarks.sd_lora [--pretrained DIR] [--rounds 3] [--iters 10] [--batch 4]
        [--rank 4] [--channels 64,128] [--threads 2] [--device cpu|cuda]
        [--modes full,lora,full+bf16,full+bf16+frozen32,lora+bf16,lora+bf16+frozen32]

A mode is `full` or `lora`, then `+bf16` (trainer.mixed_precision=bf16: the step under autocast)
and `+frozen32` (model.frozen_dtype=fp32). Each mode also reports the bytes of its frozen
parameters (VAE, text encoder, a LoRA run's base UNet; the EMA is fp32 in every mode and counted
apart), exact from the tensors, beside the peak memory the process saw.

Without --pretrained it builds a small random SD folder (the test suite's layout, UNet widths
--channels, 32x32 images) in a temporary directory. Each round starts one process per mode, the
order alternating from round to round (A B, B A, ...), because this machine's speed drifts between
whole-process runs. A process builds the model as the trainer does, runs 3 warm-up steps and
--iters timed ones (`model(batch)`, backward, AdamW, EMA) and reports the median step, its peak
RSS (CUDA: torch.cuda.max_memory_allocated), and the bytes of the state a checkpoint holds (the
model's state dict plus the optimizer's, saved with torch.save). Prints one JSON object: the
medians over rounds per mode and lora/full ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parent.parent
MODES = ("full", "lora")


def build_folder(out: Path, channels: list[int]) -> None:
    """A random Stable Diffusion folder in diffusers layout (tokenizer trained on toy captions)."""
    import torch

    from data_pipelines.sources import shapes
    from models.sd.tokenizer import load
    from models.sd.vae import VAEConfig, build_autoencoder
    from models.sd.workload import SDConfig, SDWorkload

    torch.manual_seed(0)
    shapes.build(out / "shapes", size=32, counts={"train": (16, 0)})
    vae = build_autoencoder(VAEConfig(block_out_channels=[16, 32, 32], norm_num_groups=8))
    vae.save_pretrained(out / "vae")
    cfg = SDConfig(vae=str(out / "vae"), tokenizer=str(out / "shapes/tokenizer"), unet_channels=channels, ema_decay=0)
    model = SDWorkload(cfg).build_model()
    pipe = model.pipeline(load(out / "shapes/tokenizer", 16))
    pipe.scheduler = type(model.noise_scheduler).from_config(model.noise_scheduler.config)
    pipe.save_pretrained(out / "sd")


def measure(mode: str, args) -> dict:
    import contextlib

    import torch

    from models.sd.lora import LoRAConfig
    from models.sd.workload import SDConfig, SDWorkload
    from trainer.config import OptimConfig, TrainerConfig
    from trainer.loop import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    kind, *flags = mode.split("+")
    lora = LoRAConfig(rank=args.rank if kind == "lora" else 0)
    frozen = "fp32" if "frozen32" in flags else "auto"
    cfg = SDConfig(pretrained=args.pretrained, image_size=args.image_size, ema_decay=0.999, lora=lora)
    cfg.frozen_dtype = frozen
    w = SDWorkload(cfg)
    precision = "bf16" if "bf16" in flags else "no"
    w.bind_trainer(TrainerConfig(mixed_precision=precision))
    model = w.build_model().to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    size = args.image_size
    batch = {
        "images": torch.rand(args.batch, 3, size, size, device=device) * 2 - 1,
        "input_ids": w.tokenize(["a red circle at the top left"] * args.batch).to(device),
    }

    def step(i: int) -> None:
        with autocast:
            loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.ema_update(i)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(3 + args.iters):
        start = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, Path(tmp) / "state.pt")
        checkpoint = os.path.getsize(Path(tmp) / "state.pt")
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    ema = {id(t) for name, t in model.named_parameters() if name.startswith("ema_")}
    frozen_bytes = sum(
        p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad and id(p) not in ema
    )
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_param_mb": frozen_bytes / 1e6,
        "total_params": sum(p.numel() for p in model.parameters()),
        "checkpoint_mb": checkpoint / 1e6,
        "step_ms": 1000 * statistics.median(times[3:]),
        "peak_memory_mb": peak / 1e6,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", default="", help="a diffusers SD folder (default: build a small random one)")
    p.add_argument("--channels", default="64,128", help="UNet widths of the folder built without --pretrained")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: full|lora[+bf16][+frozen32]")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    for m in modes:
        kind, *flags = m.split("+")
        if kind not in MODES or not set(flags) <= {"bf16", "frozen32"}:
            p.error(f"--modes: '{m}' is not full|lora[+bf16][+frozen32]")
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    built = not args.pretrained
    with tempfile.TemporaryDirectory() as tmp:
        if built:
            build_folder(Path(tmp), [int(c) for c in args.channels.split(",")])
            args.pretrained = str(Path(tmp) / "sd")
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--pretrained")]
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                cmd = [sys.executable, "-m", "benchmarks.sd_lora", *forwarded, "--pretrained", args.pretrained]
                out = subprocess.run([*cmd, "--child", mode], cwd=ROOT, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {
        m: {k: statistics.median(r[k] for r in rs) if not isinstance(rs[0][k], str) else rs[0][k] for k in rs[0]}
        for m, rs in runs.items()
    }
    keys = ("trainable_params", "checkpoint_mb", "step_ms", "peak_memory_mb")
    ratios = {}
    if {"full", "lora"} <= summary.keys():
        ratios["lora_over_full"] = {k: summary["lora"][k] / summary["full"][k] for k in keys}
    for kind in MODES:  # what 16-bit frozen parts save, against keeping them fp32
        a, b = summary.get(f"{kind}+bf16"), summary.get(f"{kind}+bf16+frozen32")
        if a and b:
            ratios[f"{kind}_bf16_frozen_auto_over_fp32"] = {
                k: a[k] / b[k] for k in ("frozen_param_mb", "step_ms", "peak_memory_mb")
            }
    config = {k: v for k, v in vars(args).items() if k != "child"} | ({"pretrained": "(built)"} if built else {})
    print(json.dumps({"config": config, **summary, **ratios}, indent=2))


if __name__ == "__main__":
    main()
