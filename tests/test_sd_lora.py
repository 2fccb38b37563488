"""LoRA fine-tuning of a local Stable Diffusion folder: only the adapters train and are saved,
the EMA follows the adapters, a killed-and-resumed 2-rank run matches an unbroken one, and the
exported `pytorch_lora_weights.safetensors` loads onto the base pipeline with diffusers'
load_lora_weights and samples exactly what our own pipeline samples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_past_checkpoint

from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def lora_workload(pretrained, **overrides):
    from models.sd.lora import LoRAConfig
    from models.sd.workload import SDConfig, SDWorkload

    lora = overrides.pop("lora", {"rank": 4, "alpha": 8})
    cfg = dict(pretrained=str(pretrained), ema_decay=0.9, color_match_samples=0, lora=LoRAConfig(**lora))
    cfg.update(overrides)
    return SDWorkload(SDConfig(**cfg))


def test_only_adapters_train_and_are_saved(pretrained_dir):
    torch.manual_seed(0)
    w = lora_workload(pretrained_dir)
    model = w.build_model().train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    saved = set(model.state_dict())
    ema = {n for n in saved if n.startswith("ema_lora.")}
    assert saved == trainable | ema and len(ema) == len(trainable)
    assert not any("base_layer" in n or n.startswith(("vae.", "text_encoder.")) for n in saved)

    batch = {"latents": torch.randn(4, 4, 8, 8), "input_ids": w.tokenize(["a red circle at the top"] * 4)}
    model(batch).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable  # B starts at zero, but A and B both get gradients
    assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable if ".lora_B." in n)

    # the EMA moves the adapters' averages only, 10% of the way at decay 0.9
    name = next(n for n in sorted(trainable) if ".lora_A." in n)
    live = model.get_parameter(name)
    shadow = model.ema_lora.shadow[name.removeprefix("unet.").replace(".", "/")]
    before = shadow.clone()
    with torch.no_grad():
        live.add_(1.0)
    model.ema_update(step=100)
    assert torch.allclose(shadow, before + 0.1, atol=1e-5)

    # a state dict round-trips into a freshly built model; a full fine-tune's is refused
    state = {k: v.clone() for k, v in model.state_dict().items()}
    other = w.build_model()
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(
        RuntimeError, match=r"\(model.lora.rank=4\) does not match: .*unexpected \[.unet.conv_in.weight.\]"
    ):
        other.load_state_dict({**state, "unet.conv_in.weight": torch.zeros(1)})

    # sampling with the EMA adapters puts them back afterwards
    kept = live.detach().clone()
    with model.ema_adapters():
        assert torch.equal(live, shadow)
    assert torch.equal(live, kept)


def test_lora_keys_refuse_bad_values(pretrained_dir, shapes_dir, tiny_vae):
    from models.sd.lora import LoRAConfig
    from models.sd.workload import SDConfig, SDWorkload

    with pytest.raises(ValueError, match="model.lora.rank > 0 needs model.pretrained"):
        SDWorkload(SDConfig(vae=str(tiny_vae), tokenizer=str(shapes_dir / "tokenizer"), lora=LoRAConfig(rank=4)))
    with pytest.raises(ValueError, match="model.lora.rank=-1"):
        lora_workload(pretrained_dir, lora={"rank": -1})
    with pytest.raises(ValueError, match="model.lora.dropout=1.5"):
        lora_workload(pretrained_dir, lora={"rank": 4, "dropout": 1.5})
    with pytest.raises(ValueError, match="model.lora.text_encoder=true is not supported"):
        lora_workload(pretrained_dir, lora={"rank": 4, "text_encoder": True})
    with pytest.raises(ValueError, match=r"model.lora.target_modules=\['to_nothing'\]"):
        lora_workload(pretrained_dir, lora={"rank": 4, "target_modules": ["to_nothing"]}).build_model()


def latents_of(pipe, steps=3):
    return pipe(
        ["a red circle at the top left", "a blue square"],
        num_inference_steps=steps,
        guidance_scale=2.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
    ).images


@pytest.mark.parametrize("use_ema", [True, False])
def test_lora_export_loads_with_load_lora_weights(pretrained_dir, tmp_path, use_ema):
    """pytorch_lora_weights.safetensors on the base pipeline samples what our pipeline samples
    with the (EMA) adapters; the fused export samples the same."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    w = lora_workload(pretrained_dir, lora={"rank": 4, "alpha": 8})  # alpha != rank: the metadata carries it
    model = w.build_model().eval()
    with torch.no_grad():  # trained-looking adapters and a different EMA
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
        for p in model.ema_lora.averages():
            p.normal_(0, 0.2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = model.pipeline(w.tokenizer)
    with model.ema_adapters() if use_ema else torch.no_grad():
        ours = latents_of(pipe)
    base = latents_of(pipe_from(pretrained_dir, model))
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapters change the samples

    how = w.write_pipeline(weights, tmp_path / "lora", use_ema=use_ema)
    assert "load_lora_weights" in how and ("EMA" in how) == use_ema
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "lora")
    assert torch.allclose(latents_of(loaded), base, rtol=1e-5, atol=1e-6)  # unet/ is the base
    loaded.load_lora_weights(tmp_path / "lora")
    loaded.set_progress_bar_config(disable=True)
    assert torch.allclose(latents_of(loaded), ours, rtol=1e-5, atol=1e-6)

    w.write_pipeline(weights, tmp_path / "fused", use_ema=use_ema, fuse_lora=True)
    assert not (tmp_path / "fused" / "pytorch_lora_weights.safetensors").exists()
    fused = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")
    fused.set_progress_bar_config(disable=True)
    assert torch.allclose(latents_of(fused), ours, rtol=1e-4, atol=1e-5)


def pipe_from(folder, model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(model.noise_scheduler.config, set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def torchrun(run_dir, *overrides, nproc=2):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/sd/lora_sd15.yaml"),
        f"run.dir={run_dir}",
        "trainer.progress_bar=false",
        *overrides,
    ]


def run(cmd, env):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def small(pretrained, shapes):
    return [
        f"model.pretrained={pretrained}",
        "model.image_size=32",
        "model.lora.rank=4",
        "model.lora.alpha=8",
        "model.lora.dropout=0.1",  # random, so the resumed RNG must be the saved one
        "model.ema_decay=0.9",
        "model.sample_steps=2",
        "model.sample_prompts=[a red circle]",
        f"data.train.urls={shapes}/train",
        "data.batch_size=4",
        "data.num_workers=1",
        "data.shuffle_buffer=20",
        "trainer.max_steps=8",
        "trainer.mixed_precision=no",
        "trainer.log_every=1",
        "trainer.sample_every=0",
        "trainer.num_samples=2",
        "trainer.checkpoint_every=3",
        "optim.lr=1e-2",
        "optim.warmup_steps=1",
    ]


def test_lora_run_resumes_exactly_and_exports(tmp_path, shapes_dir, pretrained_dir, cpu_env):
    """2 CPU ranks: SIGKILL after a checkpoint, resume, the same losses and adapters as an
    unbroken run; checkpoints hold the adapters (no frozen base); the run's pipeline/ loads."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    args = small(pretrained_dir, shapes_dir)
    ref = tmp_path / "ref"
    run(torchrun(ref, *args), cpu_env)
    killed = tmp_path / "killed"
    kill_past_checkpoint(torchrun(killed, *args), cpu_env, killed, checkpoint=3, past=4)
    assert "resumed from" in run(torchrun(killed, *args), cpu_env)

    def series(d):
        return [(r["step"], r["train/loss"]) for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]

    assert len(series(ref)) == 8 and series(killed) == series(ref)
    assert all(r["perf/mfu"] > 0 for r in read_jsonl(ref / "metrics.jsonl") if "train/samples_per_s" in r)
    a = load_file(str(ref / "pipeline" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "pipeline" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora.up.weight") and a[k].abs().sum() > 0 for k in a)  # B trained (diffusers: up)

    from trainer import sharded

    meta = sharded.read_metadata(ref / "checkpoints" / "step-6" / sharded.STATE_DIR)
    names = set(sharded.model_tensors(meta))
    assert names and all(".lora_" in n or n.startswith("ema_lora.") for n in names)
    # the frozen base stays as loaded
    base = load_file(str(next((pretrained_dir / "unet").glob("*.safetensors"))))
    exported = load_file(str(next((ref / "pipeline" / "unet").glob("*.safetensors"))))
    assert base.keys() == exported.keys() and all(torch.equal(base[k], exported[k]) for k in base)
    pipe = StableDiffusionPipeline.from_pretrained(ref / "pipeline")
    pipe.load_lora_weights(ref / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(latents_of(pipe, steps=2)).all()

    # any checkpoint exports the same way the end of the run did
    from launch.export import export_pipeline

    out, how = export_pipeline(ref, step=8, out=tmp_path / "step-8")
    c = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert "EMA LoRA adapters" in how and c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    out, _ = export_pipeline(ref, step=3, out=tmp_path / "step-3")
    early = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(a[k], early[k]) for k in a)


def test_ema_every_n_steps_keeps_the_horizon(pretrained_dir):
    """model.ema_every=2: the EMA stands still at odd steps and moves by 1 - decay**2 at even ones."""
    w = lora_workload(pretrained_dir, ema_every=2)
    model = w.build_model()
    name = next(n for n, p in model.unet.named_parameters() if p.requires_grad)
    live, shadow = model.unet.get_parameter(name), model.ema_lora.shadow[name.replace(".", "/")]
    start = shadow.clone()
    with torch.no_grad():
        live.add_(1.0)
    model.ema_update(step=101)
    assert torch.equal(shadow, start)
    model.ema_update(step=102)  # decay min(0.9, 103/112) = 0.9, squared: 19% of the way
    assert torch.allclose(shadow, start + 0.19, atol=1e-5)
    with pytest.raises(ValueError, match="model.ema_every=0 must be >= 1"):
        lora_workload(pretrained_dir, ema_every=0)
