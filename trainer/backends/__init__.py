"""Backends: who owns devices, wrapping, gradient sync and collective state.

The loop talks only to this small interface; `make_backend` picks one from
`trainer.backend`. Each backend also writes and reads the model and optimizer part of a
checkpoint, since only it knows how its state is laid out across ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from trainer.config import ConfigError


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
    def step(
        self, model: nn.Module, optimizer: Any, max_norm: float, skip_nonfinite: bool = False, measure: bool = True
    ) -> torch.Tensor | None: ...
    def unwrap(self, model: nn.Module) -> nn.Module: ...
    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def broadcast_object(self, obj: Any) -> Any: ...
    def barrier(self) -> None: ...

    # checkpoints (trainer/checkpoint.py): `group` is the checkpointer's own gloo group
    checkpoint_layout: str  # what step-N/ holds the model and optimizer as: "dcp" | "deepspeed"

    def checkpoint_writer(
        self, path: Path, model: nn.Module, optimizer: Any, *, step: int, group, stage: bool
    ) -> Callable[[], list[str]]: ...
    def load_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any, *, group) -> None: ...
    # consolidated weights, a tensor at a time (trainer/export.py)
    def full_tensors(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor | None]]: ...
    def load_exported(self, model: nn.Module, path: Path, *, group) -> None: ...
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...
    def end(self) -> None: ...


def check_launch_env(trainer_cfg, micro_batch: int) -> None:
    """The launcher's settings (an `accelerate launch` YAML exports them) must agree with the
    recipe; raises ConfigError before any process group starts."""
    check_launch_precision(trainer_cfg.mixed_precision)
    if trainer_cfg.backend == "accelerate":
        from trainer.backends.accelerate import check_launch_env as check

        check(trainer_cfg.accelerate)
    else:
        from trainer.backends.deepspeed import check_accelerate_launch_env, deepspeed_config

        check_accelerate_launch_env(trainer_cfg.deepspeed)
        deepspeed_config(trainer_cfg, micro_batch)  # a config_file that contradicts the recipe


def check_launch_precision(recipe: str) -> None:
    """`accelerate launch --mixed_precision X` exports ACCELERATE_MIXED_PRECISION, which our
    Accelerator never reads (the recipe's precision is passed in): a launcher asking for a
    precision the recipe does not train in is refused. Its "no" is also the launcher's
    default when nothing was asked, so it never contradicts a recipe's bf16 or fp16."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched != "no" and launched != recipe:
        raise ConfigError(
            f"accelerate launch was given --mixed_precision {launched} (ACCELERATE_MIXED_PRECISION), "
            f"but the recipe has trainer.mixed_precision={recipe}; set "
            f"trainer.mixed_precision={launched}, or launch with --mixed_precision {recipe}"
        )


def init_elastic_process_group(timeout_s: int) -> bool:
    """Form the default process group under torch elastic (torchrun, accelerate launch) in a
    key space of this start's own; True if it did.

    The elastic agent keeps one TCPStore for its workers across restarts (torch 2.13), so
    after `--max-restarts` brings the ranks back, the new group reads the previous ranks'
    addresses from it and never connects (gloo: "connection refused", or a hang). Every
    rank counts its own starts in that store; a restart starts all ranks again, so the
    count is the same on every rank of one attempt and names a fresh prefix. The backends
    (Accelerate, DeepSpeed) then find the group formed and use it.
    """
    import os
    from datetime import timedelta

    import torch.distributed as dist

    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return False
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    start = store.add(f"tributary/starts/rank{rank}", 1)
    on_gpu = torch.cuda.is_available() and env.get("ACCELERATE_USE_CPU", "") not in ("1", "true", "True")
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if on_gpu else "gloo",
        rank=rank,
        world_size=world,
        store=dist.PrefixStore(f"tributary/start{start}", store),
        timeout=timeout,
    )
    return True


def make_backend(cfg) -> Backend:
    """The backend of a run config (`trainer.backend`)."""
    t = cfg.trainer
    init_elastic_process_group(t.dist_timeout_s)
    if t.backend == "accelerate":
        from trainer.backends.accelerate import AccelerateBackend

        return AccelerateBackend(t)
    if t.backend == "deepspeed":
        from trainer.backends.deepspeed import AccelerateDeepSpeedBackend, DeepSpeedBackend, engine_via

        cls = AccelerateDeepSpeedBackend if engine_via(t.deepspeed) == "accelerate" else DeepSpeedBackend
        return cls(t, micro_batch=cfg.data.batch_size)
    raise ValueError(f"trainer.backend '{t.backend}' is not available")
