"""What latent diffusion keeps in memory: under a 16-bit trainer.mixed_precision the frozen VAE,
text encoder and (LoRA) base UNet are stored in that dtype while what trains stays fp32, the
step and the sampling pipeline run under autocast, and exports take the frozen parts from the
folder in fp32; `model.ema_offload` keeps the EMA fp32 in host memory through device and
dtype moves, and out of DDP's broadcast."""

from __future__ import annotations

import pytest
import torch

from trainer.config import TrainerConfig


def workload(pretrained, precision="bf16", backend="accelerate", **overrides):
    from models.sd.lora import LoRAConfig
    from models.sd.workload import SDConfig, SDWorkload

    lora = LoRAConfig(**overrides.pop("lora", {}))
    cfg = dict(pretrained=str(pretrained), ema_decay=0.9, color_match_samples=0, sample_steps=1, lora=lora)
    w = SDWorkload(SDConfig(**cfg | overrides))
    w.bind_trainer(TrainerConfig(mixed_precision=precision, backend=backend))
    return w


def frozen_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def batch_of(w, n=2):
    return {"images": torch.rand(n, 3, 32, 32) * 2 - 1, "input_ids": w.tokenize(["a red circle at the top"] * n)}


@pytest.mark.parametrize("rank", [0, 4])
def test_frozen_parts_take_the_training_dtype(pretrained_dir, rank):
    torch.manual_seed(0)
    lora = {"rank": rank}
    full = workload(pretrained_dir, frozen_dtype="fp32", lora=lora).build_model()
    torch.manual_seed(0)
    w = workload(pretrained_dir, lora=lora)
    half = w.build_model().train()
    assert {p.dtype for p in half.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.text_encoder.parameters()} == {torch.bfloat16}
    trained = {p.dtype for p in half.parameters() if p.requires_grad}
    assert trained == {torch.float32}  # what the optimizer steps keeps its fp32 weights
    if rank:  # the base UNet under the adapters is frozen too
        assert {p.dtype for n, p in half.unet.named_parameters() if "base_layer" in n} == {torch.bfloat16}
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    # the EMA (of the UNet, or of the adapters) averages fp32 weights
    ema = half.ema_unet if half.ema_unet is not None else half.ema_lora
    assert {p.dtype for p in ema.parameters()} == {torch.float32}
    saved = frozen_bytes(full) - frozen_bytes(half)
    ema_bytes = sum(p.numel() * p.element_size() for p in ema.parameters())
    assert saved == (frozen_bytes(full) - ema_bytes) // 2  # half of every frozen part but the EMA

    # a step under autocast, as the backend's forward has it: the same loss as fp32 within
    # bf16's rounding, gradients only where training happens, all finite
    batch = batch_of(w)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = half(batch)
    loss.backward()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = full(batch)
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) < 0.05 * reference.item()
    graded = {n for n, p in half.named_parameters() if p.grad is not None}
    assert graded == {n for n, p in half.named_parameters() if p.requires_grad}

    # sampling: the pipeline calls its modules one by one; autocast mixes the dtypes there
    images = w.generate(half, ["a red circle"], torch.Generator().manual_seed(0))
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_frozen_dtype_fp32_and_refusals(pretrained_dir):
    model = workload(pretrained_dir, frozen_dtype="fp32").build_model()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model = workload(pretrained_dir, precision="no").build_model()  # auto without mixed precision
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="model.frozen_dtype=fp32 under trainer.backend=deepspeed"):
        workload(pretrained_dir, backend="deepspeed", frozen_dtype="fp32").build_model()
    with pytest.raises(ValueError, match="model.frozen_dtype='fp16' is not one of auto, fp32"):
        workload(pretrained_dir, frozen_dtype="fp16")
    with pytest.raises(ValueError, match="model.ema_offload=true needs an EMA"):
        workload(pretrained_dir, ema_offload=True, ema_decay=0)


def test_pipeline_export_takes_frozen_parts_from_the_folder(pretrained_dir, tmp_path):
    """A 16-bit run's state exports a fp32 pipeline: VAE and text encoder bit-equal to the
    folder's, the UNet the trained one."""
    from diffusers import StableDiffusionPipeline

    w = workload(pretrained_dir, ema_decay=0)
    model = w.build_model()
    with torch.no_grad():
        model.unet.conv_in.bias.add_(1.0)  # "trained"
    w.write_pipeline(model.state_dict(), tmp_path / "out")
    base = StableDiffusionPipeline.from_pretrained(pretrained_dir)
    out = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    for part in ("vae", "text_encoder"):
        a, b = getattr(base, part).state_dict(), getattr(out, part).state_dict()
        assert all(b[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a), part
    assert torch.equal(out.unet.conv_in.bias, base.unet.conv_in.bias + 1.0)


@pytest.mark.parametrize("rank", [0, 4])
def test_ema_offload_stays_on_the_host(pretrained_dir, rank):
    torch.manual_seed(0)
    on = workload(pretrained_dir, ema_offload=True, lora={"rank": rank}).build_model()
    torch.manual_seed(0)
    off = workload(pretrained_dir, lora={"rank": rank}).build_model()
    ema_name = "ema_unet" if rank == 0 else "ema_lora"
    ema = list(getattr(on, ema_name).parameters())
    assert set(on._ddp_params_and_buffers_to_ignore) == {
        n for n, _ in on.named_parameters() if n.startswith(ema_name + ".")
    }
    assert not hasattr(off, "_ddp_params_and_buffers_to_ignore")

    # the EMA follows the same updates (here both live on the CPU; on a GPU one copy per update)
    live = [p for p in on.unet.parameters() if p.requires_grad]
    with torch.no_grad():
        for model in (on, off):
            for p in (p for p in model.unet.parameters() if p.requires_grad):
                p.add_(0.5)
            model.ema_update(step=100)
    for a, b in zip(on.state_dict().values(), off.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # a move to another device or dtype leaves the EMA where it is, fp32 on the host
    on.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in live) and all(p.dtype == torch.float32 for p in ema)
    on.to("meta")
    assert all(p.device.type == "meta" for p in on.unet.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in getattr(on, ema_name).parameters())


@pytest.mark.parametrize("rank", [0, 4])
def test_deepspeed_16_bit_keeps_the_ema_fp32(pretrained_dir, rank):
    """DeepSpeed's bf16 engine casts every parameter of the module it wraps; a bf16 EMA would
    round its small steps away. Under it the EMA is held as fp32 buffers, under the same names."""
    torch.manual_seed(0)
    plain = workload(pretrained_dir, precision="no", backend="deepspeed", lora={"rank": rank}).build_model()
    torch.manual_seed(0)
    model = workload(pretrained_dir, backend="deepspeed", lora={"rank": rank}).build_model()
    assert model.state_dict().keys() == plain.state_dict().keys()
    ema = model.ema_unet if rank == 0 else model.ema_lora
    assert not list(ema.parameters()) and {b.dtype for b in ema.buffers()} == {torch.float32}
    for p in model.parameters():  # what the engine does (runtime/engine.py, _cast_module_mixed_precision)
        p.data = p.data.to(torch.bfloat16)
    trained = [p for p in model.unet.parameters() if p.requires_grad]
    start = [b.clone() for b in ema.buffers()]
    with torch.no_grad():
        for p in trained:
            p.add_(0.01)
    model.ema_update(step=10_000)  # decay 0.9: a 0.001 step, below bf16's resolution at 1.0
    averages = (
        model.ema_lora.averages() if rank else [dict(ema.named_buffers())[n] for n, _ in model.unet.named_parameters()]
    )
    lives = [p for p in model.unet.parameters() if p.requires_grad] if rank else list(model.unet.parameters())
    begin = dict(zip(map(id, ema.buffers()), start, strict=True))
    for average, live in zip(averages, lives, strict=True):  # 10% of the way to the bf16 weights, in fp32
        want = begin[id(average)] + 0.1 * (live.float() - begin[id(average)])
        assert average.dtype == torch.float32 and torch.allclose(average, want, rtol=1e-5, atol=1e-7)
    # a bf16 EMA would not have moved where the weights are near 1 (bf16's step there is 1/128)
    assert any(((a - begin[id(a)]).abs() > 0).any() and (begin[id(a)].abs() > 0.9).any() for a in averages) or rank
    # and it loads back into the fp32 model that exports read checkpoints with
    plain.load_state_dict(model.state_dict())
