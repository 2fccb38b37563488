"""Tributary against the single-file training loops users start from, on the same model, data
and machine, interleaved round by round.

    .venv/bin/python -m benchmarks.vs_reference [--only sd,lm] [--nproc 1,2] [--rounds 3] [--steps 40]

Two pairs, each ours (a real `launch.train` under torchrun) beside a reference loop written
here the way the field's one-file scripts are (our own code, in this file):
- sd: fine-tuning a small random diffusers folder (UNet widths --sd-channels, 32x32 images) on
  an imagefolder of captioned PNGs (metadata.jsonl). The reference reads the folder through a
  torch Dataset (PIL decode, resize, center crop, CLIP tokenize) in a DataLoader, then VAE
  encode, text encode, noise, UNet forward and backward, grad clipping, AdamW. Ours reads the
  same pictures as shards (`make_shards from-folder`) with configs/sd/finetune_sd15.yaml, its
  extras (EMA, min-SNR, noise offset, checkpointing) off so that both do the same work. A
  third run, ours cached, trains on the same shards with their latents and text states
  computed once (`make_shards latents`: the posterior mean, so the per-step VAE sampling
  noise is gone), against the same reference.
- lm: a GPT-2-style model (learned positions, pre-LN, GELU MLP, tied embeddings) trained
  from a memmapped byte file with random windows, beside our LM (configs/lm/causal_1k.yaml,
  classic blocks with RoPE, tied embeddings) at the same width, depth, heads and context, on
  the same bytes as shards.
Each measurement is one process group; its rate is the median over the log windows after
the first (ours: metrics.jsonl; the reference: the same windows of its own step times, data
waits included). The order of ours and the reference alternates between rounds, because this
machine's speed drifts by 10-20% within minutes; the ratios are taken round by round. --nproc
2 runs both under torchrun with 2 ranks (DDP over gloo on CPU). Torch's threads are left at what
torchrun and torch choose, for both.

Prints one JSON line per measurement, then one object: `sd_step_ratio` (our step time over the
reference's, 1 process: below 1 is faster), `sd_cached_step_ratio` (the same, ours
cached), `lm_tokens_ratio` (our tokens/s over the
reference's, 1 process: above 1 is faster) and `rows` (every pair's medians and ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 5


# ---------------------------------------------------------------------------- inputs
def build_sd_inputs(out: Path, channels: list[int], images: int) -> dict:
    """A random SD folder, an imagefolder of captioned PNGs, and the same pictures as shards."""
    import webdataset as wds

    from benchmarks.sd_lora import build_folder
    from data_pipelines.sources import shapes
    from data_pipelines.stream import resolve_shards

    build_folder(out, channels)  # out/sd (the folder) and out/shapes (16 captioned shapes)
    shapes.build(out / "pictures", size=32, counts={"train": (images, 3)})
    folder = out / "imagefolder"
    folder.mkdir()
    records = []
    for s in wds.WebDataset(resolve_shards(str(out / "pictures/train")).urls, shardshuffle=False, empty_check=False):
        name = f"{s['__key__']}.png"
        (folder / name).write_bytes(s["png"])
        records.append({"file_name": name, "text": s["txt"].decode()})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shards = out / "sd_shards/train"
    run([sys.executable, "-m", "launch.make_shards", "from-folder", str(folder), "--out", str(shards)])
    # the same pictures through the folder's VAE and frozen text encoder, once (`sd` cached)
    latents = out / "sd_latents/train"
    run([sys.executable, "-m", "launch.make_shards", "latents", str(shards), "--pretrained", str(out / "sd"),
         "--image-size", "32", "--out", str(latents)])  # fmt: skip
    return {"pretrained": str(out / "sd"), "imagefolder": str(folder), "shards": str(shards), "latents": str(latents)}


def build_lm_inputs(out: Path, seq_len: int, megabytes: float) -> dict:
    """Byte windows of part of the standard library as shards, and the train split's bytes as
    one flat file for the reference's memmap."""
    import webdataset as wds

    from data_pipelines.sources.text import stdlib_documents
    from data_pipelines.stream import resolve_shards

    corpus = out / "corpus"
    corpus.mkdir(parents=True)
    budget = int(megabytes * 1e6)
    for i, doc in enumerate(stdlib_documents()):
        if budget <= 0:
            break
        data = doc.read()
        (corpus / f"{i:05d}.py").write_bytes(data)
        budget -= len(data)
    shards = out / "lm_shards"
    run(
        [sys.executable, "-m", "launch.make_shards", "text", str(corpus), "--seq-len", str(seq_len)]
        + ["--out", str(shards), "--min-shards", "4"]
    )
    flat = out / "train.bin"
    with open(flat, "wb") as f:
        for s in wds.WebDataset(resolve_shards(str(shards / "train")).urls, shardshuffle=False, empty_check=False):
            f.write(s["bin"])
    return {"shards": str(shards), "flat": str(flat)}


def run(cmd: list[str], env: dict | None = None) -> str:
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out.stdout


def launcher(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def env_for(nproc: int) -> dict:
    """Both loops get the same environment: torchrun's thread default (1 per rank when there
    are several), and on a machine without CUDA, CPU ranks for Accelerate."""
    import torch

    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def windows(times: list[float], width: int = LOG_EVERY) -> list[float]:
    """Seconds per step of each full window of `width` steps after the first window."""
    return [sum(times[i : i + width]) / width for i in range(width, len(times) - width + 1, width)]


# ---------------------------------------------------------------------------- ours
def ours(kind: str, inputs: dict, args, nproc: int, run_dir: Path, cached: bool = False) -> dict:
    from trainer.metrics import read_jsonl

    common = [
        f"run.dir={run_dir}",
        f"trainer.max_steps={args.steps}",
        f"trainer.log_every={LOG_EVERY}",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress_bar=false",
        "trainer.mixed_precision=no",
        "trainer.clip_grad_norm=1.0",
        f"data.num_workers={args.workers}",
        "optim.warmup_steps=0",
    ]
    if kind == "sd":
        overrides = [
            f"model.pretrained={inputs['pretrained']}",
            "model.image_size=32",
            "model.ema_decay=0",
            "model.snr_gamma=0",
            "model.noise_offset=0",
            "model.caption_dropout=0",
            "model.activation_checkpointing=false",
            "model.sample_steps=1",
            "model.sample_prompts=[a red circle]",
            f"data.train.urls={inputs['latents' if cached else 'shards']}",
            f"model.precomputed={str(cached).lower()}",
            f"data.batch_size={args.sd_batch}",
            "data.shuffle_buffer=64",
            "trainer.num_samples=1",
            "optim.lr=1e-4",
        ]
        recipe = "configs/sd/finetune_sd15.yaml"
    else:
        shards = inputs["shards"]
        overrides = [
            "model.block=classic",
            "model.attention=softmax",
            f"model.seq_len={args.lm_context}",
            f"model.dim={args.lm_dim}",
            f"model.depth={args.lm_depth}",
            f"model.heads={args.lm_heads}",
            "model.tie_embeddings=true",
            f"data.train.urls={shards}/train",
            f"data.val.urls={shards}/val",
            f"data.test.urls={shards}/val",  # a small corpus may have no test documents
            f"data.batch_size={args.lm_batch}",
            "data.shuffle_buffer=256",
            "trainer.num_samples=0",
            "optim.lr=1e-3",
        ]
        recipe = "configs/lm/causal_1k.yaml"
    cmd = [*launcher(nproc), "-m", "launch.train", "--config", str(ROOT / recipe), *common, *overrides]
    run(cmd, env_for(nproc))
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/samples_per_s" in r]
    rates = [r["train/samples_per_s"] for r in records[1:]] or [r["train/samples_per_s"] for r in records]
    samples_per_s = statistics.median(rates)
    global_batch = (args.sd_batch if kind == "sd" else args.lm_batch) * nproc
    row = {"samples_per_s": samples_per_s, "step_s": global_batch / samples_per_s}
    if kind == "lm":
        row["tokens_per_s"] = samples_per_s * args.lm_context
    row["data_wait_frac"] = statistics.median(r.get("train/data_wait_frac", 0.0) for r in records[1:] or records)
    return row


# ---------------------------------------------------------------------------- references
def reference_sd(args) -> dict:
    """A diffusers-style text-to-image fine-tuning loop."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset, DistributedSampler
    from transformers import CLIPTextModel, CLIPTokenizer

    rank, world, device = init_process_group()
    torch.manual_seed(0)
    root = Path(args.pretrained)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder").to(device).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae").to(device).requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet").to(device).train()
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    size = 32

    class ImageFolder(Dataset):
        def __init__(self, folder: Path):
            self.folder = folder
            self.rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            row = self.rows[i]
            img = Image.open(self.folder / row["file_name"]).convert("RGB")
            scale = size / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            img = img.crop((left, top, left + size, top + size))
            pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            ids = tokenizer(
                row["text"], padding="max_length", truncation=True, max_length=tokenizer.model_max_length
            ).input_ids
            return pixels, torch.tensor(ids)

    data = ImageFolder(Path(args.imagefolder))
    sampler = DistributedSampler(data, world, rank, shuffle=True, drop_last=True) if world > 1 else None
    loader = DataLoader(
        data,
        batch_size=args.sd_batch,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    model = ddp(unet, device, world)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def step(batch):
        pixels, ids = (t.to(device) for t in batch)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            states = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        pred = model(scheduler.add_noise(latents, noise, t), t, states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return timed_loop(loader, step, args.steps, device, args.sd_batch * world, sampler)


def reference_lm(args) -> dict:
    """A nanoGPT-style loop: random windows of a memmapped byte file."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    rank, world, device = init_process_group()
    torch.manual_seed(0)
    T, dim, heads = args.lm_context, args.lm_dim, args.lm_heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(dim, dim=2)
            q, k, v = (z.view(b, n, heads, dim // heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, dim)
            x = x + self.c_proj(y)
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(256, dim), nn.Embedding(T, dim)
            self.blocks = nn.ModuleList(Block() for _ in range(args.lm_depth))
            self.ln_f = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 256, bias=False)
            self.head.weight = self.wte.weight  # tied

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    net = GPT().to(device)
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95)
    )
    model = ddp(net, device, world)
    data = np.memmap(args.flat, dtype=np.uint8, mode="r")
    gen = torch.Generator().manual_seed(rank)

    def batches():
        while True:
            ix = torch.randint(len(data) - T - 1, (args.lm_batch,), generator=gen)
            x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix.tolist()])
            y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix.tolist()])
            yield x, y

    def step(batch):
        x, y = (t.to(device) for t in batch)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    row = timed_loop(batches(), step, args.steps, device, args.lm_batch * world, None)
    row["tokens_per_s"] = row["samples_per_s"] * T
    row["params"] = sum(p.numel() for p in net.parameters())
    return row


def init_process_group():
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def ddp(module, device, world):
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def timed_loop(loader, step, steps: int, device, global_batch: int, sampler) -> dict:
    """Wall time per step, data waits included, as ours counts it; the same windows."""
    import torch

    times, epoch, it = [], 0, iter(loader)
    for _ in range(steps):
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            if sampler is not None:
                sampler.set_epoch(epoch)
            it = iter(loader)
            batch = next(it)
        loss = step(batch)
        loss.item()  # the host waits for the step, as a logged loss makes it
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(windows(times))
    return {"samples_per_s": global_batch / step_s, "step_s": step_s}


def reference(kind: str, inputs: dict, args, nproc: int) -> dict:
    forwarded = [
        "--child",
        kind,
        "--steps",
        str(args.steps),
        "--workers",
        str(args.workers),
        "--sd-batch",
        str(args.sd_batch),
        "--lm-batch",
        str(args.lm_batch),
        "--lm-context",
        str(args.lm_context),
        "--lm-dim",
        str(args.lm_dim),
        "--lm-depth",
        str(args.lm_depth),
        "--lm-heads",
        str(args.lm_heads),
        *(["--pretrained", inputs["pretrained"], "--imagefolder", inputs["imagefolder"]] if kind == "sd" else []),
        *(["--flat", inputs["flat"]] if kind == "lm" else []),
    ]
    cmd = [*launcher(nproc), "-m", "benchmarks.vs_reference", *forwarded]
    lines = [line for line in run(cmd, env_for(nproc)).splitlines() if line.startswith("{")]
    return json.loads(lines[0])  # rank 0 prints first; every rank prints its own (equal by construction)


def our_lm_params(args) -> int:
    from models.lm.workload import LMConfig
    from models.registry import build_workload

    cfg = LMConfig(
        seq_len=args.lm_context, dim=args.lm_dim, depth=args.lm_depth, heads=args.lm_heads, tie_embeddings=True
    )
    return sum(p.numel() for p in build_workload(cfg).build_model().parameters())


# ---------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="sd,lm", help="which pairs: sd, lm")
    p.add_argument("--nproc", default="1,2", help="process counts to measure")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="steps per run (windows of 5; the first is warm-up)")
    p.add_argument("--workers", type=int, default=1, help="data-loader workers per rank, both loops")
    p.add_argument("--sd-channels", default="64,128")
    p.add_argument("--sd-images", type=int, default=256)
    p.add_argument("--sd-batch", type=int, default=8)
    p.add_argument("--lm-context", type=int, default=256)
    p.add_argument("--lm-dim", type=int, default=128)
    p.add_argument("--lm-depth", type=int, default=4)
    p.add_argument("--lm-heads", type=int, default=4)
    p.add_argument("--lm-batch", type=int, default=8)
    p.add_argument("--lm-megabytes", type=float, default=4.0, help="of standard-library text")
    p.add_argument("--child", choices=("sd", "lm"), help=argparse.SUPPRESS)
    p.add_argument("--pretrained", help=argparse.SUPPRESS)
    p.add_argument("--imagefolder", help=argparse.SUPPRESS)
    p.add_argument("--flat", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        row = reference_sd(args) if args.child == "sd" else reference_lm(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row), flush=True)
        return

    kinds = [k for k in args.only.split(",") if k]
    if not set(kinds) <= {"sd", "lm"}:
        p.error(f"--only: {args.only!r} names other than sd, lm")
    nprocs = [int(n) for n in args.nproc.split(",")]
    results: dict[tuple[str, int], dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = {}
        if "sd" in kinds:
            inputs["sd"] = build_sd_inputs(tmp / "sd", [int(c) for c in args.sd_channels.split(",")], args.sd_images)
        if "lm" in kinds:
            inputs["lm"] = build_lm_inputs(tmp / "lm", args.lm_context, args.lm_megabytes)
        for r in range(args.rounds):
            for kind in kinds:
                for nproc in nprocs:
                    who_all = ["ours", "reference"] + (["ours_cached"] if kind == "sd" else [])
                    pair = results.setdefault((kind, nproc), {who: [] for who in who_all})
                    order = who_all[r % len(who_all) :] + who_all[: r % len(who_all)]  # each goes first in turn
                    for who in order:
                        if who == "reference":
                            row = reference(kind, inputs[kind], args, nproc)
                        else:
                            run_dir = tmp / f"run-{kind}-{who}-{nproc}-{r}"
                            row = ours(kind, inputs[kind], args, nproc, run_dir, cached=who == "ours_cached")
                        pair[who].append(row)
                        print(json.dumps({"round": r, "pair": kind, "nproc": nproc, "who": who, **row}), flush=True)

    rows = []
    for (kind, nproc), pair in results.items():
        step_ratios = [o["step_s"] / f["step_s"] for o, f in zip(pair["ours"], pair["reference"], strict=True)]
        row = {
            "pair": kind,
            "nproc": nproc,
            "ours_step_s": statistics.median(o["step_s"] for o in pair["ours"]),
            "reference_step_s": statistics.median(f["step_s"] for f in pair["reference"]),
            "step_ratio": statistics.median(step_ratios),  # ours / reference: < 1 is faster
            "samples_per_s_ratio": statistics.median(1 / x for x in step_ratios),
            "ours_data_wait_frac": statistics.median(o["data_wait_frac"] for o in pair["ours"]),
        }
        if "ours_cached" in pair:  # ours on precomputed latents and text states, against the same reference
            cached = [o["step_s"] / f["step_s"] for o, f in zip(pair["ours_cached"], pair["reference"], strict=True)]
            row["ours_cached_step_s"] = statistics.median(o["step_s"] for o in pair["ours_cached"])
            row["cached_step_ratio"] = statistics.median(cached)
        if kind == "lm":
            row["tokens_ratio"] = row["samples_per_s_ratio"]
            row["reference_params"] = pair["reference"][0].get("params")
            row["ours_params"] = our_lm_params(args)
        rows.append(row)
    summary = {"rows": rows, "config": {k: v for k, v in vars(args).items() if v is not None and k != "child"}}
    for kind, key, field in (
        ("sd", "sd_step_ratio", "step_ratio"),
        ("sd", "sd_cached_step_ratio", "cached_step_ratio"),
        ("lm", "lm_tokens_ratio", "tokens_ratio"),
    ):
        one = [r for r in rows if r["pair"] == kind and r["nproc"] == 1]
        summary[key] = one[0][field] if one else None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
