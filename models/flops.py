"""Model FLOPs per training sample (the numerator of MFU).

The formula, for every workload: model FLOPs per sample = the FLOPs of the matrix
multiplications, convolutions and attention products (2 per multiply-add) of one forward
and one backward pass of a training step, divided by the micro-batch size. They are
counted by torch.utils.flop_counter.FlopCounterMode on a copy of the model built on the
meta device (`Workload.flops_model()`: no weights, no compute), once per run, from the
first real batch. The backward is not assumed to be 2x the forward: the counter runs
`loss.backward()` too and counts the products autograd really does, so
- a trained layer counts about 3x its forward (input and weight gradients: PaLM appendix B,
  Kaplan et al. 2020);
- a frozen part the gradient never reaches (the VAE encode and a frozen text encoder, run
  under no_grad) counts its forward only;
- a frozen layer the gradient passes through (a LoRA run's base UNet) counts its forward and
  its input gradients (about 2x), not weight gradients; attention's score and value products
  have no weights, so their backward stays 2x their forward;
- activation recomputation is not counted (MFU, not hardware FLOPs utilization);
- elementwise work (norms, activations, the optimizer) is not counted.
For the transformer LM this is 6 N + 12 L d T per token (PaLM's formula; `lm_flops_per_token`
checks it in tests).

MFU = model FLOPs per sample x samples/s / (ranks x peak FLOP/s of one rank's device);
the trainer knows the devices' peaks (trainer/meter.py).
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import send_to_device
from torch.utils.flop_counter import FlopCounterMode


def train_flops_per_sample(workload, batch: Any, batch_size: int) -> float:
    """Model FLOPs of one training step per sample (see the module doc); raises if the
    workload's loss cannot run on the meta device (e.g. it needs values on the host)."""
    model = workload.flops_model()
    model.eval()  # no dropout; our blocks recompute activations only in training mode
    for m in model.modules():  # diffusers/transformers recompute whenever grads are on
        if getattr(m, "gradient_checkpointing", False) is True:
            m.gradient_checkpointing = False
    counter = FlopCounterMode(display=False)
    with counter:
        loss = workload.flops_loss(model, send_to_device(batch, "meta"))
        if loss.requires_grad:
            loss.backward()
    return counter.get_total_flops() / batch_size


def lm_flops_per_token(n_params_nonembedding: int, layers: int, dim: int, seq_len: int) -> float:
    """PaLM's training FLOPs per token: 6 N + 12 L d T (attention scores and values, not
    halved for causal masks)."""
    return 6 * n_params_nonembedding + 12 * layers * dim * seq_len
