"""Accelerate backend (DDP; one process per device, gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from safetensors.torch import load_model, save_model
from torch import nn


class AccelerateBackend:
    def __init__(self, trainer_cfg):
        self.accelerator = Accelerator(
            mixed_precision=trainer_cfg.mixed_precision,
            # the LR schedule is ours and steps once per optimizer step; a prepared
            # scheduler would step num_processes times (FACTS.md)
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=trainer_cfg.dist_timeout_s))],
        )
        state = self.accelerator.state
        self.rank, self.world_size = state.process_index, state.num_processes
        self.is_main = self.accelerator.is_main_process
        # Accelerate says "cpu:0", which torch.load and safetensors refuse as a location
        device = self.accelerator.device
        self.device = torch.device("cpu") if device.type == "cpu" else device

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(model, optimizer)

    def no_sync(self, model: nn.Module):
        return self.accelerator.no_sync(model) if self.world_size > 1 else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global gradient norm before clipping; max_norm 0 measures without clipping."""
        limit = max_norm if max_norm > 0 else float("inf")
        return self.accelerator.clip_grad_norm_(model.parameters(), limit)

    def optimizer_step(self, optimizer: Any) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.world_size > 1 else tensor

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # DDP keeps identical replicas, so rank 0 writes the model and optimizer for everyone.
    def save_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any) -> None:
        if self.is_main:
            save_model(self.unwrap(model), str(path / "model.safetensors"))
            torch.save(optimizer.state_dict(), path / "optimizer.pt")

    def load_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any) -> None:
        missing, unexpected = load_model(self.unwrap(model), str(path / "model.safetensors"),
                                         strict=True, device="cpu")
        # load_state_dict moves the state next to each parameter
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)

    def extra_state(self) -> dict:
        scaler = self.accelerator.scaler
        return {"grad_scaler": scaler.state_dict()} if scaler is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.accelerator.scaler is not None and "grad_scaler" in state:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])

    def end(self) -> None:
        self.accelerator.end_training()
