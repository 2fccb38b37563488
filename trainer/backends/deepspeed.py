"""DeepSpeed backend: ZeRO stages 0-3, optional CPU offload, launched by torchrun or the
`deepspeed` launcher (one process per device; gloo on CPU, NCCL on GPUs).

Our trainer config is the one source of truth: micro batch, accumulation, clipping and
precision are mapped into the DeepSpeed config here, never set twice. The optimizer is
the trainer's torch AdamW (no fused-op compile; FACTS.md).
"""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

DS_TAG = "deepspeed"  # engine checkpoints live in <step-N>/deepspeed/


def deepspeed_config(trainer_cfg, micro_batch: int) -> dict:
    ds = trainer_cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}

    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": trainer_cfg.grad_accum_steps,
        "gradient_clipping": trainer_cfg.clip_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": trainer_cfg.mixed_precision == "bf16"},
        "fp16": {"enabled": trainer_cfg.mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        # with offload, our torch AdamW steps the fp32 partitions on the CPU; DeepSpeedCPUAdam
        # would be faster there but compiles an op and bypasses our LR scheduler
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.config_file:  # a user's JSON for everything else (its keys win, ours are checked)
        extra = json.loads(Path(ds.config_file).read_text())
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if key in extra and extra[key] != config[key]:
                raise ValueError(f"trainer.deepspeed.config_file sets {key}={extra[key]}, but the "
                                 f"trainer config gives {config[key]}; set it in one place")
        config.update(extra)
    return config


class DeepSpeedBackend:
    def __init__(self, trainer_cfg, micro_batch: int):
        import deepspeed

        self.cfg, self.micro_batch = trainer_cfg, micro_batch
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False,
                                   timeout=timedelta(seconds=trainer_cfg.dist_timeout_s))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        if torch.cuda.is_available():
            local = int(__import__("os").environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.stage = trainer_cfg.deepspeed.zero_stage
        self.shards_params = self.stage == 3  # forward is collective: all ranks must run it
        self._pending = 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(self.cfg, self.micro_batch))
        self.engine = engine
        return engine, ds_optimizer

    def no_sync(self, model: nn.Module):
        return contextlib.nullcontext()  # the engine knows its accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        # the loop already divided the loss by the accumulation steps
        self.engine.backward(loss, scale_wrt_gas=False)
        self._pending += 1
        if self._pending < self.cfg.grad_accum_steps:
            self.engine.step()  # not a boundary: the engine only counts

    def step(self, model: nn.Module, optimizer: Any, max_norm: float) -> torch.Tensor:
        """Optimizer step at the boundary (clipping is the engine's); the global grad norm."""
        self.engine.step()
        self._pending = 0
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else float("nan"), device=self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if hasattr(model, "module") else model

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor

    def reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        if self.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def full_state_dict(self, model: nn.Module) -> Optional[dict]:
        """The whole model's weights on rank 0 (None elsewhere). Collective."""
        if self.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.unwrap(model).state_dict() if self.is_main else None
        if sd is None:
            return None
        return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}

    def load_full_state_dict(self, model: nn.Module, path: Path) -> None:
        """Load a whole-model safetensors file into the (possibly partitioned) model. Collective."""
        net = self.unwrap(model)
        if self.stage == 3:
            import deepspeed

            state = load_file(str(path)) if self.is_main else None
            with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=0):
                if self.is_main:
                    net.load_state_dict(state, strict=True)
        else:
            net.load_state_dict(load_file(str(path)), strict=True)

    def save_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any) -> None:
        # every rank writes its partition; the marker below lets universal conversion work
        self.engine.save_checkpoint(str(path), tag=DS_TAG, save_latest=False,
                                    client_state={"universal_checkpoint_info": {}})
        sd = self.full_state_dict(model)
        if self.is_main:
            save_file(sd, str(path / "model.safetensors"))

    def load_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any) -> None:
        saved_ranks = len(list((path / DS_TAG).glob("*optim_states.pt")))
        if saved_ranks and saved_ranks != self.world_size:
            raise RuntimeError(
                f"{path}: DeepSpeed partitions were written by {saved_ranks} ranks, this run has "
                f"{self.world_size}; resume under DeepSpeed needs the same world size (or start "
                f"from the gathered weights: trainer.resume=never plus your own init from "
                f"{path / 'model.safetensors'})")
        load_path, _ = self.engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed found no engine checkpoint under '{DS_TAG}/'")

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def end(self) -> None:
        if dist.is_initialized():
            dist.barrier()
