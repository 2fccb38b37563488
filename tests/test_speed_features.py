"""The speed switches change speed only: model.sdpa_backend pins a kernel that computes the same
loss and gradients, and model.channels_last gives the same UNet, whose weights export and load
as plain ones. Their speed is measured in benchmarks/speed_features.py, never here."""

from __future__ import annotations

import pytest
import torch

from models.lm.workload import LMConfig, LMWorkload

LM = dict(seq_len=64, dim=32, depth=2, heads=2)


def lm_loss_and_grads(**overrides):
    w = LMWorkload(LMConfig(**LM, **overrides))
    torch.manual_seed(0)  # the same weights, and the same masks for the masked objective
    model = w.build_model().train()
    tokens = torch.randint(0, 256, (2, LM["seq_len"] + 1), generator=torch.Generator().manual_seed(1))
    loss = w.training_loss(model, {"tokens": tokens})
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_sdpa_backends_agree(objective):
    ref_loss, ref_grads = lm_loss_and_grads(objective=objective, sdpa_backend="math")
    for overrides in (
        {"sdpa_backend": "flash"},
        {"sdpa_backend": "auto"},
        {"sdpa_backend": "flash", "activation_checkpointing": True},
    ):
        loss, grads = lm_loss_and_grads(objective=objective, **overrides)
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), overrides
        for name, g in grads.items():
            assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), (overrides, name)


def test_bad_sdpa_backend_names_the_key():
    with pytest.raises(ValueError, match="model.sdpa_backend 'fast' is not one of"):
        LMWorkload(LMConfig(**LM, sdpa_backend="fast"))


def test_unavailable_sdpa_backend_names_the_key():
    """cuDNN attention never runs on CPU tensors."""
    with pytest.raises(RuntimeError, match="model.sdpa_backend=cudnn"):
        lm_loss_and_grads(sdpa_backend="cudnn")


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    """A caption tokenizer and an untrained AutoencoderKL folder (4x8x8 latents)."""
    from data_pipelines.sources.shapes import prompts
    from data_pipelines.tokenizer import train_clip_bpe
    from models.sd.vae import VAEConfig, build_autoencoder

    out = tmp_path_factory.mktemp("sd")
    train_clip_bpe(prompts(60), out / "tokenizer")
    torch.manual_seed(0)
    build_autoencoder(VAEConfig(block_out_channels=[16, 32, 32], norm_num_groups=8)).save_pretrained(out / "vae")
    return out


def sd_model(sd_parts, **overrides):
    from models.sd.workload import SDConfig, SDWorkload

    w = SDWorkload(
        SDConfig(
            vae=str(sd_parts / "vae"),
            tokenizer=str(sd_parts / "tokenizer"),
            unet_channels=[32, 32],
            text_hidden=32,
            ema_decay=0.9,
            **overrides,
        )
    )
    torch.manual_seed(0)
    return w, w.build_model().train()


def test_channels_last_unet_is_the_same_model_and_exports(sd_parts, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_model, save_file

    from data_pipelines.sources.shapes import prompts

    w, plain = sd_model(sd_parts)
    _, nhwc = sd_model(sd_parts, channels_last=True)
    conv = nhwc.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nhwc.ema_unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    batch = {"latents": torch.randn(4, 4, 8, 8), "input_ids": w.tokenize(prompts(4))}
    losses = []
    for model in (plain, nhwc):
        torch.manual_seed(3)  # the same noise, timesteps and caption dropout
        loss = model(batch)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.unet.named_parameters(), nhwc.unet.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5), name
    with torch.no_grad():
        plain.eval(), nhwc.eval()
        t, states = torch.tensor([10, 500, 999, 1]), plain.encode_text(batch["input_ids"])
        assert torch.allclose(
            plain.unet(batch["latents"], t, states).sample,
            nhwc.unet(batch["latents"], t, states).sample,
            rtol=1e-4,
            atol=1e-5,
        )

    # what the backends write (contiguous copies) loads strictly into either format
    state = {k: v.detach().contiguous() for k, v in nhwc.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    _, fresh = sd_model(sd_parts, channels_last=True)
    load_model(fresh, str(tmp_path / "model.safetensors"), strict=True)
    assert fresh.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    load_model(plain, str(tmp_path / "model.safetensors"), strict=True)

    # the diffusers export of a channels_last run is an ordinary UNet folder
    w_nhwc, _ = sd_model(sd_parts, channels_last=True)
    w_nhwc.export(nhwc.state_dict(), tmp_path, {})
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "pipeline/unet")
    for name, p in nhwc.ema_unet.state_dict().items():
        assert torch.equal(unet.state_dict()[name], p), name
