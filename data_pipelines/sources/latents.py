"""Precomputed latents (and text-encoder states) for latent diffusion.

The VAE (and a frozen text encoder) cost the same at every step for the same image; this
runs them once over an image-caption shard folder and writes shards with `latent.npy`
(the posterior mean times the VAE's scaling factor), the caption `txt`, the `json` record
and, when a frozen text encoder is given, `text.npy` (its last hidden states). Storing the
mean drops the posterior's per-step sampling noise, which is small for a KL-regularised VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch
import webdataset as wds

from data_pipelines.decode import image_tensor
from data_pipelines.shards import samples_per_shard, write_shards
from data_pipelines.stream import resolve_shards


@torch.no_grad()
def precompute(
    src: str,
    out_dir: str | Path,
    *,
    vae_dir: str,
    image_size: int,
    pretrained: str = "",
    batch: int = 64,
    maxcount: int = 0,
    min_shards: int = 0,
    device: str | None = None,
) -> dict:
    from diffusers import AutoencoderKL

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if pretrained:
        from transformers import CLIPTextModel, CLIPTokenizer

        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae").to(dev).eval()
        text_encoder = CLIPTextModel.from_pretrained(Path(pretrained) / "text_encoder").to(dev).eval()
        tok = CLIPTokenizer.from_pretrained(Path(pretrained) / "tokenizer")
    else:
        vae, text_encoder, tok = AutoencoderKL.from_pretrained(vae_dir).to(dev).eval(), None, None
    scale = float(vae.config.scaling_factor)
    shards = resolve_shards(src, key="--in")
    if maxcount <= 0:  # as many shards as the source, so as many ranks x workers can read it
        maxcount = -(-shards.total_samples // len(shards.urls)) if shards.total_samples else 10_000
    if min_shards and shards.total_samples:
        maxcount = min(maxcount, samples_per_shard(shards.total_samples, 1, min_shards))
    reader = wds.WebDataset(shards.urls, shardshuffle=False, empty_check=False)

    def encoded():
        pending: list[dict] = []

        def flush():
            images = torch.stack([image_tensor(s, image_size) for s in pending]).to(dev)
            latents = (vae.encode(images).latent_dist.mean * scale).float().cpu().numpy()
            states = None
            if text_encoder is not None:
                ids = tok(
                    [s["txt"].decode("utf-8") for s in pending],
                    padding="max_length",
                    truncation=True,
                    max_length=tok.model_max_length,
                    return_tensors="pt",
                ).input_ids.to(dev)
                states = text_encoder(ids)[0].half().cpu().numpy()
            for i, s in enumerate(pending):
                out = {"__key__": s["__key__"], "latent.npy": latents[i], "txt": s["txt"]}
                if "json" in s:
                    out["json"] = s["json"]
                if states is not None:
                    out["text.npy"] = states[i]
                yield out
            pending.clear()

        for sample in reader:
            if "txt" not in sample:
                raise KeyError(f"{sample.get('__url__')}: sample {sample['__key__']} has no 'txt' caption")
            pending.append(sample)
            if len(pending) == batch:
                yield from flush()
        if pending:
            yield from flush()

    return write_shards(encoded(), out_dir, maxcount=maxcount)


def precompute_splits(src_root: str | Path, out_root: str | Path, splits=("train", "val", "test"), **kw) -> dict:
    return {
        s: precompute(str(Path(src_root) / s), Path(out_root) / s, **kw)
        for s in splits
        if (Path(src_root) / s).is_dir()
    }
