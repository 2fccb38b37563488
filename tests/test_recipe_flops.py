"""Every shipped recipe (configs/**/*.yaml, the GPU-sized ones too) gets its model FLOPs
counted for perf/mfu through the trainer's own path (ThroughputMeter.count_flops_once ->
Workload.flops_per_sample on the meta device), from a batch of synthetic raw samples through
the workload's decode and collate. Local folders a recipe names (a pretrained Stable
Diffusion, a VAE stage, a tokenizer) are the tiny test fixtures; nothing trains."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_lm_gpu_recipes import stand_in_tokenizer

from launch.recipes import load_recipe
from models.registry import build_workload
from trainer.meter import ThroughputMeter

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml"))
BATCH = 2
VOCABULARIES = {"gpt2": 50257, "llama": 32000}  # else the BPE recipes' (make data-lm-bpe: 4096)


def local_folders(recipe: str, fixtures: dict) -> list[str]:
    """Overrides pointing the recipe's local folders at the fixtures."""
    m = load_recipe(ROOT / "configs" / recipe).model
    if m.name == "lm" and m.tokenizer:  # a stand-in of the real vocabulary's size
        vocab = next((n for key, n in VOCABULARIES.items() if key in m.tokenizer), 4096)
        return [f"model.tokenizer={fixtures['tokenizers'][vocab]}"]
    if m.name == "sd" and m.pretrained:
        return [f"model.pretrained={fixtures['pretrained']}"]
    if m.name == "sd":
        shapes = fixtures["shapes"]
        return [
            f"model.vae={fixtures['vae']}",
            f"model.tokenizer={shapes / 'tokenizer'}",
            f"model.sample_prompts={shapes / 'prompts.txt'}",
            f"model.color_palette={shapes / 'palette.json'}",
        ]
    return []


def png(size: int, mode: str) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (size, size), 128).save(out, format="png")
    return out.getvalue()


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def raw_sample(workload, i: int) -> dict:
    """One shard sample of the fields this workload decodes, at the recipe's sizes."""
    m, s = workload.cfg, {"__key__": f"s{i:06d}"}
    name = m.name
    if name in ("made", "nade", "fvsbn", "factorized"):
        s["png"] = png(m.image_size, "L")
    elif name == "score" and m.data_kind == "image":
        s["png"] = png(workload.side, "L")
    elif name == "score":
        s["json"] = json.dumps({"x": [0.0] * m.dims})
    elif name == "vae":
        s["png"] = png(m.image_size, "RGB")
    elif name == "detr":
        s["png"] = png(m.image_size, "RGB")
        s["json"] = json.dumps({"objects": [{"label": 0, "box": [8, 8, 24, 24]}]})
    elif name in ("oadtr", "oad_gru"):
        s["npy"] = npy(np.zeros((m.window, m.feature_dim), np.float32))
        s["json"] = json.dumps({"label": 0, "future": [0] * m.anticipation})
    elif name == "lm" and m.tokenizer:
        s["ids.npy"] = npy(np.zeros(m.seq_len + 1, np.int32))
        s["json"] = json.dumps({"bytes": m.seq_len})
    elif name == "lm":
        s["bin"] = b"a" * (m.seq_len + 1)
    elif name == "sd":
        s["txt"] = b"a red circle"
        if m.precomputed:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.load_config(m.vae)
            side = m.image_size // 2 ** (len(vae["block_out_channels"]) - 1)
            s["latent.npy"] = npy(np.zeros((vae["latent_channels"], side, side), np.float32))
        else:
            s["png"] = png(m.image_size, "RGB")
    else:
        raise AssertionError(f"no synthetic sample for workload {name}: add one here")
    for k, v in list(s.items()):
        if k != "__key__" and isinstance(v, str):
            s[k] = v.encode()
    return s


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, shapes_dir, tiny_vae, pretrained_dir):
    folder = tmp_path_factory.mktemp("tokenizers")
    tokenizers = {n: stand_in_tokenizer(folder / f"vocab{n}.json", n) for n in (4096, *VOCABULARIES.values())}
    return {"tokenizers": tokenizers, "pretrained": pretrained_dir, "vae": tiny_vae, "shapes": shapes_dir}


def recipe_batch(recipe: str, fixtures: dict, *overrides: str):
    """The recipe's workload as the trainer binds it, and a batch of synthetic samples."""
    cfg = load_recipe(ROOT / "configs" / recipe, [*local_folders(recipe, fixtures), *overrides])
    workload = build_workload(cfg.model)
    workload.bind_trainer(cfg.trainer)
    return workload, workload.collate([workload.decode(raw_sample(workload, i)) for i in range(BATCH)])


def recipe_flops(recipe: str, fixtures: dict) -> float:
    """FLOPs per sample as the trainer counts them on its first batch (0.0: not counted)."""
    workload, batch = recipe_batch(recipe, fixtures)
    said: list[str] = []
    meter = ThroughputMeter(workload, samples_per_step=BATCH, world_size=1, peak=1.0, count_flops=True, say=said.append)
    meter.count_flops_once(batch, BATCH)
    if recipe in NO_MATMULS:
        assert meter.flops_per_sample == 0.0 and "no matrix multiplications" in said[0]
    else:
        assert not said, f"{recipe}: {said}"
    return meter.flops_per_sample


# independent Bernoulli pixels (64 biases): no multiply-add, so no MFU, and the log says why
NO_MATMULS = {"autoregressive/factorized.yaml"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_counts_its_flops(recipe, fixtures):
    flops = recipe_flops(recipe, fixtures)
    print(f"{recipe:40s} {flops:.4g} FLOPs/sample")
    assert flops > 0 or recipe in NO_MATMULS


@pytest.mark.parametrize("recipe", ["sd/finetune_sd15.yaml", "sd/lora_sd15.yaml"])
def test_frozen_sd_parts_count_their_forward_only(recipe, fixtures):
    """The pretrained-folder recipes: the frozen VAE encode and text encoder count 1x their
    forward; a trained UNet 3x (backward 2x), a LoRA run's frozen UNet less (no weight
    gradients, only those of its inputs and the adapters')."""
    from accelerate.utils import send_to_device
    from torch.utils.flop_counter import FlopCounterMode

    workload, batch = recipe_batch(recipe, fixtures, "model.image_size=64")
    counted = workload.flops_per_sample(batch, BATCH) * BATCH
    model, batch = workload.flops_model().eval(), send_to_device(batch, "meta")

    def forward_flops(fn) -> tuple[float, object]:
        counter = FlopCounterMode(display=False)
        with counter:
            out = fn()
        return counter.get_total_flops(), out

    vae, latents = forward_flops(lambda: model.encode_images(batch["images"]))
    text, states = forward_flops(lambda: model.encode_text(batch["input_ids"]))
    t = torch.zeros(BATCH, dtype=torch.long, device="meta")
    unet, _ = forward_flops(lambda: model.unet(latents, t, states).sample)
    assert vae > 0 and text > 0 and unet > 0
    if model.lora:
        assert vae + text + 2 * unet < counted < vae + text + 3 * unet
    else:  # the first conv's input (the noisy latents) needs no gradient: a hair under 3x
        assert counted == pytest.approx(vae + text + 3 * unet, rel=0.01)
