"""Accelerate backend (DDP; one process per device, gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list
from safetensors.torch import load_file, load_model
from torch import nn

from trainer.config import ConfigError


def fsdp_plugin(acc_cfg):
    """FSDP2 (fully_shard): FSDP1 refuses CPU devices (docs/platform-notes.md). The shard units are chosen
    per model in `prepare` (fsdp_units); the rest stays with the root."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="size_based_wrap",
        min_num_params=acc_cfg.fsdp_min_params,
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )


def fsdp_units(model: nn.Module, min_params: int) -> list[str]:
    """Class names of the model's FSDP2 units: every member of an outermost ModuleList /
    Sequential / ModuleDict holding at least `min_params` parameters, the blocks that
    submodules list in `_no_split_modules` (the transformers/diffusers convention) and those
    submodules themselves. Accelerate's size-based policy would also pick the ModuleList
    itself, which fully_shard refuses (a container has no forward).

    A whole library model inside ours (a latent diffusion model's UNet, its EMA copy, VAE
    and text encoder) is its own unit, so that it gathers its parameters when it is called
    on its own, outside the root's forward (a sampling pipeline decoding with the VAE or
    denoising with the EMA UNet), and a frozen part shares no unit with a trained one."""
    present = {type(m).__name__ for m in model.modules()}
    names: set[str] = set()
    for module in model.modules():
        blocks = getattr(module, "_no_split_modules", None)
        if blocks and module is not model:
            names.add(type(module).__name__)
        # only classes the model holds: CLIPTextModel also names its vision tower's blocks
        names.update(n for n in blocks or () if n in present)

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                for member in child.children():
                    if sum(p.numel() for p in member.parameters()) >= min_params:
                        names.add(type(member).__name__)
                    else:
                        walk(member)
            else:
                walk(child)

    walk(model)
    return sorted(names)


def forward_methods(module: nn.Module) -> list[str]:
    """The methods other than `forward` that a library declares as entry points of a module:
    diffusers marks them with `apply_forward_hook` (AutoencoderKL's encode and decode) so that
    offload hooks run on them; FSDP2 must gather the parameters there too."""
    cls = type(module)  # under FSDP2 a subclass of the library's class
    if not any(c.__module__.startswith("diffusers.") for c in cls.__mro__):
        return []
    from diffusers.utils.accelerate_utils import apply_forward_hook

    marked = apply_forward_hook(lambda self: None).__code__  # one code object for every wrapper
    return sorted(
        name for name in dir(cls) if name != "forward" and getattr(getattr(cls, name, None), "__code__", None) is marked
    )


def register_forward_methods(model: nn.Module) -> None:
    """FSDP2 gathers a unit's parameters around `forward` only: a unit called another way
    (`vae.encode(images)`) would meet its own parameters still sharded."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    for module in model.modules():
        if isinstance(module, FSDPModule):
            for name in forward_methods(module):
                register_fsdp_forward_method(module, name)


def check_launch_env(acc_cfg) -> None:
    """`accelerate launch` with a DeepSpeed or FSDP YAML exports ACCELERATE_USE_* and the
    Accelerator would silently follow them over the recipe: refuse a contradiction."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ConfigError(
            "accelerate launch was given a DeepSpeed config, but the recipe has "
            "trainer.backend=accelerate; set trainer.backend=deepspeed (and "
            "trainer.deepspeed.zero_stage), or launch with a non-DeepSpeed config"
        )
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and acc_cfg.strategy != "fsdp":
        raise ConfigError(
            f"accelerate launch was given an FSDP config, but the recipe has "
            f"trainer.accelerate.strategy={acc_cfg.strategy}; set "
            f"trainer.accelerate.strategy=fsdp, or launch with a non-FSDP config"
        )


class AccelerateBackend:
    def __init__(self, trainer_cfg):
        acc = trainer_cfg.accelerate
        check_launch_env(acc)
        plugin = fsdp_plugin(acc) if acc.strategy == "fsdp" else None
        self.accelerator = Accelerator(
            mixed_precision=trainer_cfg.mixed_precision,
            # the LR schedule is ours and steps once per optimizer step; a prepared
            # scheduler would step num_processes times (docs/platform-notes.md)
            step_scheduler_with_optimizer=False,
            fsdp_plugin=plugin,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=trainer_cfg.dist_timeout_s))],
        )
        self.fsdp, self.min_params = acc.strategy == "fsdp", acc.fsdp_min_params
        self._stager = None  # host buffers of background saves (trainer.checkpoint_async)
        state = self.accelerator.state
        if self.fsdp and state.distributed_type == DistributedType.MULTI_CPU:
            # Accelerate 1.15 applies an FSDP plugin only on accelerator devices: on CPU ranks it
            # keeps MULTI_CPU and prepare() silently wraps DDP. Its FSDP2 path runs on CPU too
            # (fully_shard over gloo), so it is asked for here, as a GPU launch gets it.
            state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
            if trainer_cfg.mixed_precision != "no":  # what Accelerate does for a GPU launch
                plugin.set_mixed_precision(trainer_cfg.mixed_precision)
        self.name = "Accelerate FSDP2 (fully_shard)" if self.fsdp else "Accelerate DDP"
        self.shards_params = self.fsdp  # forward is collective: all ranks must run it
        self.rank, self.world_size = state.process_index, state.num_processes
        self.is_main = self.accelerator.is_main_process
        # Accelerate says "cpu:0", which torch.load and safetensors refuse as a location
        device = self.accelerator.device
        self.device = torch.device("cpu") if device.type == "cpu" else device

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        if self.fsdp:
            from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

            plugin = self.accelerator.state.fsdp_plugin
            units = fsdp_units(model, self.min_params)
            plugin.auto_wrap_policy = transformer_auto_wrap_policy if units else None
            plugin.transformer_cls_names_to_wrap = units or None
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.fsdp:
            register_forward_methods(model)
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

    def step(
        self, model: nn.Module, optimizer: Any, max_norm: float, skip_nonfinite: bool = False, measure: bool = True
    ) -> torch.Tensor | None:
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

    # ---------------------------------------------------------------- checkpoints
    checkpoint_layout = "dcp"

    def checkpoint_writer(self, path: Path, model: nn.Module, optimizer: Any, *, step: int, group, stage: bool):
        """Model and optimizer as DCP shards (trainer/sharded.py): every rank writes what it
        holds; DDP's replicas are split over the ranks, FSDP2's shards stay where they are."""
        from trainer import sharded

        if stage and self._stager is None:
            self._stager = sharded.HostStager()
        return sharded.writer(
            path,
            self.unwrap(model),
            optimizer.optimizer,
            step=step,
            rank=self.rank,
            group=group,
            stager=self._stager if stage else None,
        )

    def load_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any, *, group) -> None:
        from trainer import sharded

        if (path / sharded.STATE_DIR).is_dir():
            sharded.load(path, self.unwrap(model), optimizer.optimizer, group=group)
        elif (path / "optimizer.pt").exists():
            self._load_full_files(path, model, optimizer)
        else:
            from trainer.checkpoint import IncompatibleCheckpointError

            raise IncompatibleCheckpointError(
                f"{path} holds no Accelerate model state (state/): it was written by DeepSpeed "
                "(deepspeed/); resume it with trainer.backend=deepspeed, or export its weights "
                "(python -m launch.export) and start a new run from them"
            )

    def _load_full_files(self, path: Path, model: nn.Module, optimizer: Any) -> None:
        """The earlier layout: model.safetensors + optimizer.pt, whole, written by rank 0."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from trainer.export import check_shapes

        net = self.unwrap(model)
        check_shapes(path / "model.safetensors", net, path)
        # load_state_dict moves the state next to each parameter
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if self.fsdp:
            full = load_file(str(path / "model.safetensors")) if self.is_main else {}
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(net, full, options=options)
            set_optimizer_state_dict(net, optimizer.optimizer, state, options=options)
        else:
            load_model(net, str(path / "model.safetensors"), strict=True, device="cpu")
            optimizer.load_state_dict(state)

    def full_tensors(self, model: nn.Module):
        """(name, whole tensor on the CPU) of every model tensor, one at a time, on rank 0
        (None elsewhere): a consolidated export never holds more than the tensor at hand.
        Collective under FSDP2 (one all-gather per tensor)."""
        net = self.unwrap(model)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            for name, tensor in get_model_state_dict(net).items():
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                yield name, full.detach().cpu().clone() if self.is_main else None
                del full
        elif self.is_main:
            for name, tensor in net.state_dict().items():
                yield name, tensor.detach().cpu().clone()

    def load_exported(self, model: nn.Module, path: Path, *, group) -> None:
        """Load a safetensors export (one file or an indexed set, trainer/export.py) into the
        model, each rank reading only its slices. Collective."""
        from trainer import sharded

        sharded.load_full_model(path, self.unwrap(model), group=group)

    def extra_state(self) -> dict:
        scaler = self.accelerator.scaler
        return {"grad_scaler": scaler.state_dict()} if scaler is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.accelerator.scaler is not None and "grad_scaler" in state:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])

    def end(self) -> None:
        self.accelerator.end_training()
