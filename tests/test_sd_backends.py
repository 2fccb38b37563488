"""Latent diffusion under the sharded backends: the tiny local-folder fine-tune (frozen VAE
and text encoder, a trained UNet and its EMA) on 2 CPU ranks under FSDP2 and DeepSpeed
ZeRO-2 is SIGKILLed after a checkpoint, resumes with the losses of an unbroken run, and
exports an EMA UNet that a diffusers UNet loads. Under ZeRO-3 the EMA is refused at the
first step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_past_checkpoint

from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {
    "fsdp": ["trainer.accelerate.strategy=fsdp", "trainer.accelerate.fsdp_min_params=1000"],
    "zero2": ["trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=2"],
    "zero3": ["trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=3"],
}


def torchrun(run_dir, backend, *overrides):
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/sd/finetune_sd15.yaml"),
        f"run.dir={run_dir}",
        "trainer.progress_bar=false",
        *BACKENDS[backend],
        *overrides,
    ]


def finetune(pretrained, shapes, steps, checkpoint_every):
    return [
        f"model.pretrained={pretrained}",
        "model.image_size=32",
        "model.ema_decay=0.9",
        "model.sample_steps=1",
        f"data.train.urls={shapes}/train",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=10",
        f"trainer.max_steps={steps}",
        "trainer.grad_accum_steps=1",
        "trainer.mixed_precision=no",
        "trainer.log_every=1",
        "trainer.sample_every=0",
        "trainer.num_samples=1",
        f"trainer.checkpoint_every={checkpoint_every}",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
    ]


def run(cmd, env, ok=True):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    return out


def losses(run_dir):
    return [(r["step"], r["train/loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


def test_fsdp_units_of_a_model_with_frozen_parts(pretrained_dir):
    """Each library model inside ours is an FSDP2 unit of its own, beside the blocks it names;
    names of classes the model lacks (CLIP's vision tower) are left out, as fully_shard's
    policy would refuse them; the VAE's encode/decode gather like a forward."""
    from models.sd.workload import SDConfig, SDWorkload
    from trainer.backends.accelerate import forward_methods, fsdp_units

    model = SDWorkload(SDConfig(pretrained=str(pretrained_dir), ema_decay=0.9)).build_model()
    units = fsdp_units(model, min_params=1000)
    assert {"UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "ResnetBlock2D", "CLIPEncoderLayer"} <= set(units)
    assert "CLIPVisionEmbeddings" not in units and "LatentDiffusion" not in units
    present = {type(m).__name__ for m in model.modules()}
    assert set(units) <= present
    assert forward_methods(model.vae) == ["decode", "encode"]
    assert forward_methods(model.unet) == [] and forward_methods(model.text_encoder) == []


def check_killed_resume_and_export(tmp_path, backend, small, env, steps, checkpoint, past, pretrained):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run(torchrun(ref, backend, *small), env)
    kill_past_checkpoint(torchrun(killed, backend, *small), env, killed, checkpoint=checkpoint, past=past)
    out = run(torchrun(killed, backend, *small), env)
    assert "resumed from" in out.stdout + out.stderr
    assert len(losses(ref)) == steps and losses(killed) == losses(ref)
    check_layout(killed / f"checkpoints/step-{checkpoint}", backend)

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    run([sys.executable, "-m", "launch.export", str(killed), "--which", "latest"], env)
    exported = {}
    for f in sorted((killed / "export").glob("*.safetensors")):
        exported.update(load_file(str(f)))
    ema = {k.removeprefix("ema_unet."): v for k, v in exported.items() if k.startswith("ema_unet.")}
    live = {k.removeprefix("unet."): v for k, v in exported.items() if k.startswith("unet.")}
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
    start = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_state_dict(ema, strict=True)  # every UNet tensor, whole, under its diffusers name
    assert all(torch.equal(unet.state_dict()[k], ema[k]) for k in ema)
    assert any(not torch.equal(start[k], ema[k]) for k in start)  # the EMA moved off the start ...
    assert any(not torch.equal(live[k], ema[k]) for k in live)  # ... and is not the live UNet
    for part in ("vae", "text_encoder"):  # frozen: exported as loaded
        want = load_file(str(next((pretrained / part).glob("*.safetensors"))))
        got = {k.removeprefix(f"{part}."): v for k, v in exported.items() if k.startswith(f"{part}.")}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
    # each run's end wrote a diffusers pipeline from its EMA UNet: the resumed run's is the
    # unbroken run's, bit for bit, and the one the checkpoint export holds
    for d in (killed, ref):
        end = load_file(str(next((d / "pipeline" / "unet").glob("*.safetensors"))))
        assert end.keys() == ema.keys() and all(torch.equal(end[k], ema[k]) for k in ema), d.name


def check_layout(ckpt, backend):
    """What each backend made of the frozen parts: FSDP2 shards every part, the EMA and the
    frozen VAE and text encoder too, and keeps optimizer state for the UNet alone; DeepSpeed
    partitions optimizer state for the UNet's parameters only and keeps the rest as frozen
    module state."""
    if backend == "fsdp":
        from trainer.sharded import read_metadata

        index = read_metadata(ckpt / "state").state_dict_metadata
        model = {k.removeprefix("model."): v for k, v in index.items() if k.startswith("model.")}
        parts = {k.split(".")[0] for k in model}
        assert parts == {"unet", "ema_unet", "vae", "text_encoder"}
        assert all(len(v.chunks) == 2 for v in model.values())  # each rank holds its own half
        moments = [k for k in index if k.endswith(".exp_avg")]
        assert moments and all(k.removeprefix("optim.state.").startswith("unet.") for k in moments), moments[:3]
        assert len(moments) == sum(k.startswith("unet.") for k in model)
    else:
        states = torch.load(ckpt / "deepspeed/mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        trained = [name for group in states["param_shapes"] for name in group]
        assert trained and all(name.startswith("unet.") for name in trained)
        frozen = {name.split(".")[0] for name in states["frozen_param_shapes"]}
        assert frozen == {"ema_unet", "vae", "text_encoder"}


# make test: the full fine-tune under FSDP2 and a bf16 LoRA under ZeRO-2; the drills swap them
@pytest.mark.parametrize("backend", ["fsdp", pytest.param("zero2", marks=pytest.mark.drill)])
def test_finetune_resumes_exactly_and_exports_ema(tmp_path, backend, pretrained_dir, shapes_dir, cpu_env):
    small = finetune(pretrained_dir, shapes_dir, steps=6, checkpoint_every=3)
    check_killed_resume_and_export(tmp_path, backend, small, cpu_env, 6, 3, 4, pretrained_dir)


LORA = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.dropout=0.1", "trainer.mixed_precision=bf16"]


@pytest.mark.parametrize("backend", [pytest.param("fsdp", marks=pytest.mark.drill), "zero2"])
def test_bf16_lora_resumes_exactly_and_exports(tmp_path, backend, pretrained_dir, shapes_dir, cpu_env):
    """bf16 LoRA with an EMA of the adapters: under DeepSpeed the engine casts the whole module
    to bf16 (the VAE gets bf16 pixels); under FSDP2 the frozen base is bf16 beside fp32 adapters.
    Killed after a checkpoint, the resumed run has the unbroken run's losses and LoRA file, and
    that file loads onto the base pipeline."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    small = finetune(pretrained_dir, shapes_dir, steps=6, checkpoint_every=3) + LORA
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run(torchrun(ref, backend, *small), cpu_env)
    kill_past_checkpoint(torchrun(killed, backend, *small), cpu_env, killed, checkpoint=3, past=4)
    out = run(torchrun(killed, backend, *small), cpu_env)
    assert "resumed from" in out.stdout + out.stderr
    assert len(losses(ref)) == 6 and losses(killed) == losses(ref)
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses(ref))
    a, b = (load_file(str(d / "pipeline" / "pytorch_lora_weights.safetensors")) for d in (ref, killed))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora.up.weight") and a[k].abs().sum() > 0 for k in a)  # B trained
    pipe = StableDiffusionPipeline.from_pretrained(killed / "pipeline")
    pipe.load_lora_weights(killed / "pipeline")
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}  # the export is fp32


@pytest.mark.drill
@pytest.mark.parametrize("backend", ["fsdp", "zero2"])
def test_finetune_long_with_accumulation(tmp_path, backend, pretrained_dir, shapes_dir, cpu_env):
    small = finetune(pretrained_dir, shapes_dir, steps=16, checkpoint_every=5) + [
        "trainer.grad_accum_steps=2",
        "model.activation_checkpointing=true",
        "trainer.sample_every=8",
        "trainer.num_samples=2",
    ]
    check_killed_resume_and_export(tmp_path, backend, small, cpu_env, 16, 10, 12, pretrained_dir)


def test_ema_update_refuses_zero3_placeholders():
    """The EMA update itself: parameters that carry ZeRO-3's partition mark are refused, plain
    ones are averaged (the 2-rank run of this refusal is a drill below)."""
    from types import SimpleNamespace

    from models.sd.workload import LatentDiffusion

    live, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    cfg = SimpleNamespace(ema_every=1, ema_decay=0.5)
    fake = SimpleNamespace(unet=live, ema_unet=ema, ema_lora=None, ema_offload=False, cfg=cfg)
    before = ema.weight.clone()
    LatentDiffusion.ema_update(fake, 100)
    assert not torch.equal(ema.weight, before)  # it moved towards the live weights
    live.weight.ds_status = "NOT_AVAILABLE"  # what DeepSpeed ZeRO-3 sets on its partitioned parameters
    with pytest.raises(RuntimeError, match="model.ema_decay > 0 under DeepSpeed ZeRO-3"):
        LatentDiffusion.ema_update(fake, 101)


@pytest.mark.drill
def test_zero3_refuses_the_ema(tmp_path, pretrained_dir, shapes_dir, cpu_env):
    """ZeRO-3 leaves the UNet's parameters partitioned away from the module between steps: an
    EMA of them would stand still, so the run stops at its first step, saying what to use."""
    small = finetune(pretrained_dir, shapes_dir, steps=1, checkpoint_every=0)
    out = run(torchrun(tmp_path / "z3", "zero3", *small), cpu_env, ok=False)
    assert out.returncode != 0
    assert "model.ema_decay > 0 under DeepSpeed ZeRO-3" in out.stdout + out.stderr
    assert "use ZeRO-2, FSDP or model.ema_decay=0" in out.stdout + out.stderr
