"""The UNet's activation memory for one training micro-batch, measured on the meta device.

Method: the UNet runs one forward on meta tensors (no memory, no arithmetic) at the recipe's
latent size (image size / the VAE's factor) and micro-batch, in the weights' dtype, and every
tensor autograd saves for backward is caught with `torch.autograd.graph.saved_tensors_hooks`
and counted once per storage, the parameters left out (they are counted as weights).
- Without checkpointing the peak is all of it: everything saved lives until backward.
- With diffusers' gradient checkpointing the UNet is given a checkpoint function of ours that
  runs each unit (a ResNet block, a transformer block) under a hook of its own: what stays is
  what is saved outside the units plus each unit's inputs, and backward recomputes one unit at
  a time on top of that, so the peak is retained + the largest unit's saved tensors and the
  grads of its output and input.
Not counted: the frozen VAE and text encoder (they run under no_grad), a trained text encoder,
the temporaries of a single op. The meta device has only the math attention kernel, which
saves the attention matrix; attention is counted as flash attention keeps it (q, k, v, output
and the log-sum-exp), as torch's CPU and CUDA kernels do. On CPU, the count agrees with the
peak of torch.profiler's memory timeline over a real forward and backward, with and without
checkpointing, within a few percent (tests/test_doctor_sd.py).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F


class FlashSaved(torch.autograd.Function):
    """Attention on meta tensors that saves what a flash kernel saves for backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the measurement stops after forward
        raise NotImplementedError


@contextlib.contextmanager
def flash_attention_on_meta():
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        return FlashSaved.apply(q, k, v) if q.is_meta else real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


class SavedBytes:
    """A saved_tensors_hooks pair that adds up the bytes of each storage once."""

    def __init__(self, skip: set[int]):
        self.skip, self.seen, self.bytes = skip, set(), 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.skip and key not in self.seen:
            self.seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def unet_activation_bytes(model: nn.Module, batch: int, image_size: int, checkpointing: bool) -> int:
    """Peak bytes of the UNet's saved activations for `batch` samples (see the module's
    docstring). `model`: a LatentDiffusion on the meta device, in the dtype training uses."""
    unet, vae = model.unet, model.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = image_size // factor
    p = next(unet.parameters())
    dev, dtype = p.device, p.dtype
    text = model.text_encoder.config
    latents = torch.zeros(batch, unet.config.in_channels, side, side, device=dev, dtype=dtype)
    states = torch.zeros(batch, model.empty_ids.shape[-1], text.hidden_size, device=dev, dtype=dtype)
    t = torch.zeros(batch, dtype=torch.long, device=dev)
    params = {q.untyped_storage()._cdata for q in model.parameters()}
    outside = SavedBytes(params)
    largest = [0]

    def checkpoint(module, *args):
        inner = SavedBytes(params)
        with inner.hooks():
            out = module(*args)
        # its backward holds the recomputed saves and the grads of its output and input
        grads = 2 * sum(
            o.numel() * o.element_size() for o in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(o)
        )
        largest[0] = max(largest[0], inner.bytes + grads)
        for a in args:  # kept for the recompute
            if isinstance(a, torch.Tensor):
                outside.pack(a)
        return out

    was = unet.is_gradient_checkpointing
    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    else:
        unet.disable_gradient_checkpointing()
    try:
        with torch.enable_grad(), flash_attention_on_meta(), outside.hooks():
            unet(latents.requires_grad_(False), t, states)
    finally:
        (unet.enable_gradient_checkpointing if was else unet.disable_gradient_checkpointing)()
    return outside.bytes + largest[0]
