"""Accelerate backend (DDP; one process per device, gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from trainer.config import ConfigError


def fsdp_plugin(acc_cfg):
    """FSDP2 (fully_shard): FSDP1 refuses CPU devices (FACTS.md). Every module whose own
    parameters reach `fsdp_min_params` is a shard unit; the rest stays with the root."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="size_based_wrap",
        min_num_params=acc_cfg.fsdp_min_params, state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False)


def check_launch_env(acc_cfg) -> None:
    """`accelerate launch` with a DeepSpeed or FSDP YAML exports ACCELERATE_USE_* and the
    Accelerator would silently follow them over the recipe: refuse a contradiction."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ConfigError("accelerate launch was given a DeepSpeed config, but the recipe has "
                         "trainer.backend=accelerate; set trainer.backend=deepspeed (and "
                         "trainer.deepspeed.zero_stage), or launch with a non-DeepSpeed config")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and acc_cfg.strategy != "fsdp":
        raise ConfigError(f"accelerate launch was given an FSDP config, but the recipe has "
                         f"trainer.accelerate.strategy={acc_cfg.strategy}; set "
                         f"trainer.accelerate.strategy=fsdp, or launch with a non-FSDP config")


class AccelerateBackend:
    def __init__(self, trainer_cfg):
        acc = trainer_cfg.accelerate
        check_launch_env(acc)
        self.accelerator = Accelerator(
            mixed_precision=trainer_cfg.mixed_precision,
            # the LR schedule is ours and steps once per optimizer step; a prepared
            # scheduler would step num_processes times (FACTS.md)
            step_scheduler_with_optimizer=False,
            fsdp_plugin=fsdp_plugin(acc) if acc.strategy == "fsdp" else None,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=trainer_cfg.dist_timeout_s))],
        )
        self.fsdp = acc.strategy == "fsdp"
        self.name = "Accelerate FSDP2 (fully_shard)" if self.fsdp else "Accelerate DDP"
        self.shards_params = self.fsdp  # forward is collective: all ranks must run it
        state = self.accelerator.state
        self.rank, self.world_size = state.process_index, state.num_processes
        self.is_main = self.accelerator.is_main_process
        # Accelerate says "cpu:0", which torch.load and safetensors refuse as a location
        device = self.accelerator.device
        self.device = torch.device("cpu") if device.type == "cpu" else device

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.world_size == 1 and isinstance(model, nn.parallel.DistributedDataParallel):
            # a launcher's group of one makes Accelerate wrap DDP anyway, whose buffer
            # broadcast and gradient buckets cost ~0.7 ms a step (MADE, CPU) for nothing; the inner
            # module keeps Accelerate's autocast forward
            model = model.module
        return model, optimizer

    def no_sync(self, model: nn.Module):
        return self.accelerator.no_sync(model) if self.world_size > 1 else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator.scaler is None:
            loss.backward()  # what accelerator.backward does here, less a division by 1 (we accumulate)
        else:
            self.accelerator.backward(loss)  # fp16: the loss scaler's

    def step(self, model: nn.Module, optimizer: Any, max_norm: float,
             skip_nonfinite: bool = False, measure: bool = True) -> Optional[torch.Tensor]:
        """Clip to max_norm (0: no clipping), step, zero; the global norm before clipping,
        or None when there is no clipping and no `measure` (a norm costs a pass over the grads).

        skip_nonfinite: leave the weights and optimizer state alone when the norm is NaN or
        Inf (one host sync). The norm is global, so every rank makes the same choice. Under
        fp16 the grad scaler already skips such steps and lowers its scale: it is left to it.
        """
        norm = None
        if max_norm > 0:
            norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        elif measure or skip_nonfinite:
            self.accelerator.unscale_gradients()  # fp16: the norm of the true gradients
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if norm is not None:
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2
            norm = norm.detach()
        # Accelerate's optimizer wrapper looks for an optional package and inspects a
        # signature on every call (a few hundred us a step on a CPU); without a grad scaler it does
        # nothing else for us (we never use its accumulation), so step the torch optimizer
        inner = optimizer.optimizer if self.accelerator.scaler is None else optimizer
        if not (skip_nonfinite and self.accelerator.scaler is None and not torch.isfinite(norm)):
            inner.step()
        inner.zero_grad(set_to_none=True)
        return norm

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.world_size > 1 else tensor

    def reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="max") if self.world_size > 1 else tensor

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def full_state_dict(self, model: nn.Module) -> Optional[dict]:
        """The whole model's weights on rank 0 (None elsewhere). Collective."""
        if self.fsdp:
            sd = self.accelerator.get_state_dict(model)
        else:
            sd = self.unwrap(model).state_dict() if self.is_main else None
        if not self.is_main:
            return None
        return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}

    def load_full_state_dict(self, model: nn.Module, path: Path) -> None:
        """Load a whole-model safetensors file into the (possibly sharded) model. Collective."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            state = load_file(str(path)) if self.is_main else {}
            set_model_state_dict(self.unwrap(model), state, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
        else:
            load_model(self.unwrap(model), str(path), strict=True, device="cpu")

    # DDP keeps identical replicas, so rank 0 writes the model and optimizer for everyone;
    # FSDP gathers both to full tensors first, so the files are the same at any world size.
    def save_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any) -> None:
        sd = self.full_state_dict(model)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim_state = get_optimizer_state_dict(self.unwrap(model), optimizer.optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        else:
            optim_state = optimizer.state_dict() if self.is_main else None
        if self.is_main:
            save_file(sd, str(path / "model.safetensors"))
            torch.save(optim_state, path / "optimizer.pt")

    def load_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any) -> None:
        self.load_full_state_dict(model, path / "model.safetensors")
        # load_state_dict moves the state next to each parameter
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.unwrap(model), optimizer.optimizer, state, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
        else:
            optimizer.load_state_dict(state)

    def extra_state(self) -> dict:
        scaler = self.accelerator.scaler
        return {"grad_scaler": scaler.state_dict()} if scaler is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.accelerator.scaler is not None and "grad_scaler" in state:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])

    def end(self) -> None:
        self.accelerator.end_training()
