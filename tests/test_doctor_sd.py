"""launch.doctor on the SD workload (the tiny local "pretrained" folder): frozen parts hold
weights only, LoRA trains the adapters only, the EMA is one more weights-sized copy (on the
host with model.ema_offload), and the estimate agrees with the bytes a real built model holds
after a real AdamW step; the UNet's activations measured on the meta device agree with the
same count on a real CPU forward."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from launch import doctor
from trainer.config import TrainerConfig

TOLERANCE = 0.15  # as tests/test_doctor_memory.py


def sd_cfg(pretrained, **keys):
    from models.sd.lora import LoRAConfig
    from models.sd.workload import SDConfig

    lora = LoRAConfig(rank=keys.pop("lora_rank", 0))
    return SDConfig(pretrained=str(pretrained), color_match_samples=0, lora=lora, **keys)


def parts(model_cfg, mixed_precision="no", **trainer):
    t = TrainerConfig(mixed_precision=mixed_precision, **trainer)
    size = doctor.count_params(model_cfg)
    return {p.what: p for p in doctor.memory_per_rank(t, size, nodes=1, per_node=1, model_cfg=model_cfg)}, size


def one(ps, start):
    (p,) = [p for what, p in ps.items() if what.startswith(start)]
    return p


def test_lora_trains_only_the_adapters(pretrained_dir):
    full, full_size = parts(sd_cfg(pretrained_dir, ema_decay=0))
    lora, lora_size = parts(sd_cfg(pretrained_dir, ema_decay=0, lora_rank=4))
    from models.sd.workload import SDWorkload

    model = SDWorkload(sd_cfg(pretrained_dir, ema_decay=0, lora_rank=4)).build_model()
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapters == lora_size.trainable > 0
    trained = one(lora, "UNet LoRA adapters fp32 weights, grads and AdamW state")
    assert trained.bytes == 16 * adapters  # 4 weight + 4 grad + 8 AdamW moments
    assert trained.bytes < 0.05 * one(full, "UNet fp32 weights").bytes
    unet = sum(p.numel() for p in model.unet.parameters()) - adapters
    frozen = one(lora, "frozen base UNet+VAE+text encoder")
    assert frozen.bytes == 4 * (unet + full_size.total - full_size.trainable)  # fp32 (mixed_precision no)


def test_ema_is_a_weights_copy_on_device_or_host(pretrained_dir):
    no_ema, size = parts(sd_cfg(pretrained_dir, ema_decay=0))
    on_device, _ = parts(sd_cfg(pretrained_dir, ema_decay=0.9))
    offloaded, _ = parts(sd_cfg(pretrained_dir, ema_decay=0.9, ema_offload=True))
    ema = on_device["EMA of the UNet (fp32)"]
    assert ema.place == "device" and ema.bytes == 4 * size.trainable  # the whole UNet trains
    assert offloaded["EMA of the UNet (fp32)"].place == "host"
    assert not any(what.startswith("EMA") for what in no_ema)
    lora, lora_size = parts(sd_cfg(pretrained_dir, ema_decay=0.9, lora_rank=4))
    assert lora["EMA of the LoRA adapters (fp32)"].bytes == 4 * lora_size.trainable


def test_frozen_parts_halve_under_bf16_unless_fp32(pretrained_dir):
    fp32 = one(parts(sd_cfg(pretrained_dir, ema_decay=0))[0], "frozen VAE+text encoder")
    auto = one(parts(sd_cfg(pretrained_dir, ema_decay=0), "bf16")[0], "frozen VAE+text encoder")
    kept = one(parts(sd_cfg(pretrained_dir, ema_decay=0, frozen_dtype="fp32"), "bf16")[0], "frozen VAE+text encoder")
    assert auto.bytes == fp32.bytes / 2 and "(bf16)" in auto.what
    assert kept.bytes == fp32.bytes and "(fp32)" in kept.what
    trained = [one(parts(sd_cfg(pretrained_dir, ema_decay=0), mp)[0], "UNet fp32").bytes for mp in ("no", "bf16")]
    assert trained[0] == trained[1]  # Accelerate keeps the trained weights fp32 under autocast


def test_fsdp_shards_every_part(pretrained_dir):
    from trainer.config import AccelerateSection

    cfg = sd_cfg(pretrained_dir, ema_decay=0.9)
    t = TrainerConfig(accelerate=AccelerateSection(strategy="fsdp"))
    size = doctor.count_params(cfg)
    one_rank = doctor.memory_per_rank(TrainerConfig(), size, nodes=1, per_node=1, model_cfg=cfg)
    two = doctor.memory_per_rank(t, size, nodes=1, per_node=2, model_cfg=cfg)
    assert sum(p.bytes for p in two) == pytest.approx(sum(p.bytes for p in one_rank) / 2)


def test_deepspeed_counts_frozen_and_ema_in_16_bit(pretrained_dir):
    from trainer.config import DeepSpeedSection

    cfg = sd_cfg(pretrained_dir, ema_decay=0.9)
    size = doctor.count_params(cfg)
    t = TrainerConfig(backend="deepspeed", mixed_precision="bf16", deepspeed=DeepSpeedSection(zero_stage=2))
    ps = {p.what: p for p in doctor.memory_per_rank(t, size, nodes=1, per_node=2, model_cfg=cfg)}
    # the engine casts the parameters to bf16; the EMA, held as buffers, stays fp32
    assert ps["EMA of the UNet (fp32)"].bytes == 4 * size.trainable
    assert ps["EMA of the UNet (fp32)"].place == "device"
    assert ps["frozen VAE+text encoder"].bytes == 2 * (size.total - 2 * size.trainable)
    cfg = sd_cfg(pretrained_dir, ema_decay=0.9, ema_offload=True)
    ps = {p.what: p for p in doctor.memory_per_rank(t, size, nodes=1, per_node=2, model_cfg=cfg)}
    assert ps["EMA of the UNet (fp32)"].place == "host"


def held_after_a_step(model) -> int:
    """Bytes of every parameter, grad and AdamW state tensor after one real step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = {"images": images, "input_ids": model.empty_ids[None].repeat(2, 1)}
    model(batch).backward()
    opt.step()
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]  # not step
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("keys", [dict(ema_decay=0.9), dict(ema_decay=0.9, lora_rank=4)], ids=["full", "lora"])
def test_estimate_matches_a_real_model_after_an_adamw_step(pretrained_dir, keys):
    from models.sd.workload import SDWorkload

    cfg = sd_cfg(pretrained_dir, **keys)
    ps, _ = parts(cfg)
    ours = sum(p.bytes for p in ps.values())
    torch.manual_seed(0)
    theirs = held_after_a_step(SDWorkload(cfg).build_model())
    assert abs(ours - theirs) <= TOLERANCE * theirs, (ours, theirs, ps)
    # the comparison can fail: leaving out the EMA (full), or counting grads and AdamW state for
    # the frozen parameters too (LoRA), misses by more than the tolerance
    size = doctor.count_params(cfg)
    if keys.get("lora_rank"):
        wrong = ours + 12 * (size.total - size.trainable)
    else:
        wrong = ours - ps["EMA of the UNet (fp32)"].bytes
    assert abs(wrong - theirs) > TOLERANCE * theirs


def real_peak(unet, inputs, checkpointing: bool, path) -> int:
    """Peak bytes over a real CPU forward + backward of everything but the parameters and the
    inputs, from torch.profiler's memory timeline: activations, autograd's buffers, and the
    weights' grads made by then (the doctor counts those apart; here they are small)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category  # the timeline's columns

    (unet.enable_gradient_checkpointing if checkpointing else unet.disable_gradient_checkpointing)()
    unet.zero_grad(set_to_none=True)  # an earlier step's grads would count
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        unet(*inputs).sample.pow(2).mean().backward()
    with warnings.catch_warnings():  # deprecated for CUDA's memory snapshots, which do not cover CPU
        warnings.simplefilter("ignore", FutureWarning)
        prof.export_memory_timeline(str(path), device="cpu")
    _, sizes = json.loads(path.read_text())
    skip = {_CATEGORY_TO_INDEX[c] + 1 for c in (Category.PARAMETER, Category.INPUT)}
    return max(sum(v for i, v in enumerate(row) if i not in skip) for row in sizes)


def test_unet_activations_on_meta_agree_with_a_real_cpu_step(pretrained_dir, tmp_path):
    """The meta count against the profiler's real peak, with and without checkpointing (fp32)."""
    from models.sd.memory import unet_activation_bytes
    from models.sd.workload import SDWorkload

    torch.manual_seed(0)
    model = SDWorkload(sd_cfg(pretrained_dir, ema_decay=0)).build_model()
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    side, length, batch = 32 // factor, model.empty_ids.shape[-1], 8
    inputs = (
        torch.randn(batch, 4, side, side),
        torch.zeros(batch, dtype=torch.long),
        torch.randn(batch, length, model.text_encoder.config.hidden_size),
    )
    real = {ck: real_peak(model.unet, inputs, ck, tmp_path / f"timeline{ck}.json") for ck in (False, True)}
    model.unet.disable_gradient_checkpointing()
    meta = model.to("meta")
    ours = {ck: unet_activation_bytes(meta, batch, 32, checkpointing=ck) for ck in (False, True)}
    for ck in (False, True):
        assert abs(ours[ck] - real[ck]) <= TOLERANCE * real[ck], (ck, ours, real)
    assert real[True] < 0.6 * real[False]  # checkpointing matters at this size: the check above can tell
    assert unet_activation_bytes(meta, 2 * batch, 32, checkpointing=False) == 2 * ours[False]  # per sample
    assert not meta.unet.is_gradient_checkpointing  # left as it was


def test_doctor_line_names_the_sd_parts(capsys, pretrained_dir, shapes_dir, tmp_path):
    argv = [
        "--config",
        str(doctor.Path(__file__).resolve().parents[1] / "configs" / "sd" / "lora_sd15.yaml"),
        f"model.pretrained={pretrained_dir}",
        "model.image_size=32",
        f"data.train.urls={shapes_dir / 'train'}",
        f"run.dir={tmp_path / 'run'}",
    ]
    assert doctor.main(argv) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.split()[1:2] == ["memory"]]
    for words in (
        "UNet LoRA adapters fp32 weights, grads and AdamW state",
        "frozen base UNet+VAE+text encoder (bf16)",
        "EMA of the LoRA adapters (fp32)",
        "with gradient checkpointing, measured on the meta device",
    ):
        assert words in line, line
