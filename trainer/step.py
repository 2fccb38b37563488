"""One optimizer step: `grad_accum_steps` micro-batches (gradients synchronised on the last
only), backward, then the backend's clip and optimizer step, then the LR schedule."""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import send_to_device

from trainer.faults import failpoint, poison


class TrainStep:
    def __init__(
        self,
        *,
        backend,
        workload,
        model,
        optimizer,
        scheduler,
        loader,
        meter,
        grad_accum_steps: int,
        batch_size: int,
        clip_grad_norm: float,
        skip_nonfinite: bool,
        fp16: bool,
    ):
        self.backend, self.workload, self.model = backend, workload, model
        self.optimizer, self.scheduler, self.loader, self.meter = optimizer, scheduler, loader, meter
        self.accum, self.batch_size, self.clip = grad_accum_steps, batch_size, clip_grad_norm
        self.skip_nonfinite, self.fp16 = skip_nonfinite, fp16

    def __call__(
        self, step: int, *, measure_norm: bool, label=contextlib.nullcontext
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the step's loss over its micro-batches, detached; the global grad norm or None)."""
        b, model = self.backend, self.model
        step_loss = None
        for micro in range(self.accum):
            with self.meter.waiting_for_data(), label("data"):
                if micro == 0:
                    failpoint("step.data", step=step, rank=b.rank)  # a drill's slow reader
                batch = send_to_device(next(self.loader), b.device)
            self.meter.count_flops_once(batch, self.batch_size)
            with contextlib.nullcontext() if micro == self.accum - 1 else b.no_sync(model):
                with label("forward"):
                    loss = self.workload.training_loss(model, batch)
                    if self.accum > 1:
                        loss = loss / self.accum
                    loss = poison("step.loss", loss, step=step, rank=b.rank)
                with label("backward"):
                    b.backward(loss)
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        with label("optimizer"):
            norm = b.step(model, self.optimizer, self.clip, self.skip_nonfinite, measure_norm)
        if norm is not None and self.fp16:  # an overflow is the loss scaler's to skip, not ours
            norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
        self.scheduler.step()
        return step_loss, norm
