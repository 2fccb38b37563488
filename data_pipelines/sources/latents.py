"""Precomputed latents (and text-encoder states) for latent diffusion.

The VAE (and a frozen text encoder) cost the same at every step for the same image; this
runs them once over an image-caption shard folder and writes shards with `latent.npy`
(the posterior mean times the VAE's scaling factor), the caption `txt`, the `json` record
and, when a frozen text encoder is given, `text.npy` (its last hidden states). Storing the
mean drops the posterior's per-step sampling noise, which is small for a KL-regularised VAE.

Without buckets every image is scaled to cover image_size x image_size and center cropped.
With `buckets` (data_pipelines.buckets) each image goes to the bucket the training stream
would pick for it, is scaled to cover that bucket and center cropped (the pixels that
data_pipelines.image_transforms makes without random choices), and only images of one
bucket share a VAE batch: a latent is (C, H/f, W/f) of its bucket, and the stream groups
latents by that shape. The `json` record gains `latent`: the bucket (width, height), the
original (height, width) and the crop's (top, left); the manifest counts latents per
bucket. A latent is fixed once written, so random crops and flips (data.transforms) do not
apply to precomputed latents; to vary them, write several precomputed copies.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import webdataset as wds

from data_pipelines.buckets import Buckets
from data_pipelines.buckets import image_size as stored_size
from data_pipelines.image_transforms import ImageInfo, image_with_info
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
    buckets: Buckets | None = None,
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
    if buckets is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        bad = [f"{w}x{h}" for w, h in buckets.sizes if w % factor or h % factor]
        if bad:
            raise ValueError(
                f"buckets {', '.join(bad)}: the VAE downsamples by {factor}, so bucket sides must be "
                f"multiples of {factor} (choose the bucket step or sizes so)"
            )
    shards = resolve_shards(src, key="--in")
    if maxcount <= 0:  # as many shards as the source, so as many ranks x workers can read it
        maxcount = -(-shards.total_samples // len(shards.urls)) if shards.total_samples else 10_000
    if min_shards and shards.total_samples:
        maxcount = min(maxcount, samples_per_shard(shards.total_samples, 1, min_shards))
    reader = wds.WebDataset(shards.urls, shardshuffle=False, empty_check=False)
    counts: dict[str, int] = {}  # latents per bucket, for the manifest (filled as they are written)

    def encoded():
        # samples waiting for a VAE batch, per bucket (None: image_size squares); held
        # undecoded, so at most buckets x (batch - 1) images' bytes wait
        pending: dict[tuple[int, int] | None, list[dict]] = {}

        def flush(bucket):
            group = pending.pop(bucket)
            made = [image_with_info(s if bucket is None else {**s, "__bucket__": bucket}, image_size) for s in group]
            images = torch.stack([pixels for pixels, _ in made]).to(dev)
            latents = (vae.encode(images).latent_dist.mean * scale).float().cpu().numpy()
            states = None
            if text_encoder is not None:
                ids = tok(
                    [s["txt"].decode("utf-8") for s in group],
                    padding="max_length",
                    truncation=True,
                    max_length=tok.model_max_length,
                    return_tensors="pt",
                ).input_ids.to(dev)
                states = text_encoder(ids)[0].half().cpu().numpy()
            for i, s in enumerate(group):
                out = {"__key__": s["__key__"], "latent.npy": latents[i], "txt": s["txt"]}
                if bucket is not None:
                    out["json"] = with_crop(s, bucket, made[i][1])
                    name = "{}x{}".format(*bucket)
                    counts[name] = counts.get(name, 0) + 1
                elif "json" in s:
                    out["json"] = s["json"]
                if states is not None:
                    out["text.npy"] = states[i]
                yield out

        for sample in reader:
            if "txt" not in sample:
                raise KeyError(f"{sample.get('__url__')}: sample {sample['__key__']} has no 'txt' caption")
            bucket = None if buckets is None else buckets.nearest(*stored_size(sample))
            pending.setdefault(bucket, []).append(sample)
            if len(pending[bucket]) == batch:
                yield from flush(bucket)
        for bucket in list(pending):
            yield from flush(bucket)

    return write_shards(encoded(), out_dir, maxcount=maxcount, extra={"buckets": counts} if buckets else None)


def with_crop(sample: dict, bucket: tuple[int, int], info: ImageInfo) -> bytes:
    """The sample's json record with `latent`: how its image became the latent."""
    record = json.loads(sample["json"]) if "json" in sample else {}
    if not isinstance(record, dict):
        raise ValueError(f"sample {sample['__key__']}: its json is not an object, so the bucket cannot be added")
    record["latent"] = {
        "bucket": list(bucket),  # (width, height) in pixels
        "original_size": list(info.original_size),  # (height, width) of the stored image
        "crop_top_left": list(info.crop_top_left),  # (top, left) in the image scaled to cover the bucket
    }
    return json.dumps(record).encode()


def precompute_splits(
    src_root: str | Path, out_root: str | Path, splits=("train", "val", "test"), *, buckets=None, **kw
) -> dict:
    """Every split present; buckets only for train, since eval streams are not bucketed and
    an eval batch needs one latent shape (image_size squares)."""
    return {
        s: precompute(str(Path(src_root) / s), Path(out_root) / s, buckets=buckets if s == "train" else None, **kw)
        for s in splits
        if (Path(src_root) / s).is_dir()
    }
