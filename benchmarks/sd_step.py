"""Step time of the tiny from-scratch Stable Diffusion recipe, per component, on one rank.

    .venv/bin/python -m benchmarks.sd_step [--recipe configs/sd/tiny.yaml] [--vae-recipe configs/sd/tiny_vae.yaml]
        [--batch 32] [--iters 20] [--threads 1] [--tokenizer data/shapes/tokenizer]

Times, in ms per step (median of --iters after 3 warm-up steps), with the recipe's model
and per-rank batch: decoding a batch of shard samples (PNG + tokenizing, in a loader
worker in real runs), VAE encode, text encoder forward, UNet forward + backward (with the
text encoder's backward when it is trained), AdamW step, EMA update, and the whole
training step as the trainer runs it (`model(batch)`, backward, step, EMA) with images and
with precomputed latents (the recipe's setting). The VAE is built untrained from the stage-one recipe (the cost
does not depend on its weights). --threads 1 is one rank's share of the 2-core machine
under `make train-sd`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "configs/sd/tiny.yaml"))
    p.add_argument("--vae-recipe", default=str(ROOT / "configs/sd/tiny_vae.yaml"))
    p.add_argument("--tokenizer", default=str(ROOT / "data/shapes/tokenizer"))
    p.add_argument("--shards", default=str(ROOT / "data/shapes/train"))
    p.add_argument("--batch", type=int, default=0, help="per-rank batch (default: the recipe's)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import webdataset as wds

    from launch.recipes import load_recipe
    from models.registry import build_workload
    from trainer.loop import build_optimizer

    vae_cfg = load_recipe(args.vae_recipe)
    cfg = load_recipe(args.recipe)
    batch_size = args.batch or cfg.data.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        vae_model = build_workload(vae_cfg.model).build_model().vae
        vae_model.register_to_config(scaling_factor=0.6)
        vae_model.save_pretrained(tmp)
        cfg.model.vae, cfg.model.tokenizer = tmp, args.tokenizer
        cfg.model.precomputed = False  # decode images here; the latents path is timed below
        cfg.model.sample_prompts, cfg.model.color_match_samples = None, 0  # no sampling is timed
        w = build_workload(cfg.model)
        model = w.build_model().train()
    optimizer = build_optimizer(model, cfg.optim)

    raw = []
    for s in wds.WebDataset(sorted(glob.glob(f"{args.shards}/*.tar")), shardshuffle=False):
        raw.append(s)
        if len(raw) == batch_size:
            break
    decode_ms = timed(lambda: w.collate([w.decode(s) for s in raw]), max(3, args.iters // 4))
    batch = w.collate([w.decode(s) for s in raw])
    with torch.no_grad():
        latents = model.encode_images(batch["images"])
    ids = batch["input_ids"]
    states = model.encode_text(ids).detach()
    t = torch.randint(0, 1000, (batch_size,))

    def unet_fwd_bwd():
        s = model.encode_text(ids) if model.cfg.train_text_encoder else states
        model.unet(latents, t, s).sample.square().mean().backward()

    def full(b):
        def step():
            model(b).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.ema_update(100)

        return step

    out = {
        "batch_per_rank": batch_size,
        "threads": args.threads,
        "params_unet_M": sum(p.numel() for p in model.unet.parameters()) / 1e6,
        "params_text_encoder_M": sum(p.numel() for p in model.text_encoder.parameters()) / 1e6,
        "params_vae_M": sum(p.numel() for p in model.vae.parameters()) / 1e6,
        "decode_batch_ms": decode_ms,
    }
    with torch.no_grad():
        out["vae_encode_ms"] = timed(lambda: model.encode_images(batch["images"]), args.iters)
        out["text_encoder_fwd_ms"] = timed(lambda: model.text_encoder(ids)[0], args.iters)
    out["unet_fwd_bwd_ms"] = timed(unet_fwd_bwd, args.iters)
    optimizer.zero_grad(set_to_none=True)
    model(batch).backward()
    out["optimizer_step_ms"] = timed(optimizer.step, args.iters)
    optimizer.zero_grad(set_to_none=True)
    out["ema_update_ms"] = timed(lambda: model.ema_update(100), args.iters)
    out["step_from_images_ms"] = timed(full(batch), args.iters)
    out["step_from_latents_ms"] = timed(full({"latents": latents, "input_ids": ids}), args.iters)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
