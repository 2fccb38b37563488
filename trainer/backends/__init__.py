"""Backends: who owns devices, wrapping, gradient sync and collective state.

The loop talks only to this small interface; `make_backend` picks one from
`trainer.backend`. Each backend also writes and reads the model and optimizer part of a
checkpoint, since only it knows how its state is laid out across ranks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import nn


class Backend(Protocol):
    rank: int
    world_size: int
    is_main: bool
    device: torch.device
    shards_params: bool  # True when a forward pass is collective (ZeRO-3, FSDP)
    name: str  # what runs, in words (printed at start)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]: ...
    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, model: nn.Module, optimizer: Any, max_norm: float) -> torch.Tensor: ...
    def unwrap(self, model: nn.Module) -> nn.Module: ...
    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def full_state_dict(self, model: nn.Module) -> Optional[dict]: ...
    def load_full_state_dict(self, model: nn.Module, path: Path) -> None: ...
    def broadcast_object(self, obj: Any) -> Any: ...
    def barrier(self) -> None: ...
    def save_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any) -> None: ...
    def load_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any) -> None: ...
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...
    def end(self) -> None: ...


def check_launch_env(trainer_cfg, micro_batch: int) -> None:
    """The launcher's settings (an `accelerate launch` YAML exports them) must agree with the
    recipe; raises ConfigError before any process group starts."""
    if trainer_cfg.backend == "accelerate":
        from trainer.backends.accelerate import check_launch_env as check
        check(trainer_cfg.accelerate)
    else:
        from trainer.backends.deepspeed import check_accelerate_launch_env, deepspeed_config
        check_accelerate_launch_env(trainer_cfg.deepspeed)
        deepspeed_config(trainer_cfg, micro_batch)  # a config_file that contradicts the recipe


def make_backend(cfg) -> Backend:
    """The backend of a run config (`trainer.backend`)."""
    t = cfg.trainer
    if t.backend == "accelerate":
        from trainer.backends.accelerate import AccelerateBackend

        return AccelerateBackend(t)
    if t.backend == "deepspeed":
        from trainer.backends.deepspeed import AccelerateDeepSpeedBackend, DeepSpeedBackend, engine_via

        cls = AccelerateDeepSpeedBackend if engine_via(t.deepspeed) == "accelerate" else DeepSpeedBackend
        return cls(t, micro_batch=cfg.data.batch_size)
    raise ValueError(f"trainer.backend '{t.backend}' is not available")
