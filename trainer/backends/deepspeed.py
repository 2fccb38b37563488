"""DeepSpeed backend: ZeRO stages 0-3, optional CPU offload (one process per device; gloo
on CPU, NCCL on GPUs). The engine is built either by us (`deepspeed.initialize`, under
torchrun or the `deepspeed` launcher) or by Accelerate's DeepSpeed plugin (under
`accelerate launch` with a DeepSpeed config); `trainer.deepspeed.via` picks, `auto` follows
the launcher.

Our trainer config is the one source of truth: micro batch, accumulation, clipping and
precision are mapped into the DeepSpeed config here, never set twice. The optimizer is
the trainer's torch AdamW (no fused-op compile; docs/platform-notes.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from trainer.config import ConfigError


@contextlib.contextmanager
def weights_only_torch_load():
    """DeepSpeed 0.19 reads its checkpoint files with torch.load(weights_only=False), which
    runs any pickle a tampered file holds. Inside this block torch.load is weights-only,
    allowing just the few DeepSpeed types its optimizer-state files name."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        torch.load = load
        try:
            yield
        finally:
            torch.load = real


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
    if ds.config_file:  # a user's JSON for everything else: its tuning keys win, ours are checked
        try:
            extra = json.loads(Path(ds.config_file).read_text())
        except (OSError, ValueError) as exc:
            what = "is not valid JSON" if isinstance(exc, ValueError) else "cannot be read"
            raise ConfigError(f"config key 'trainer.deepspeed.config_file': {ds.config_file} {what} ({exc})") from None
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if key in extra and extra[key] != config[key]:
                raise ConfigError(
                    f"trainer.deepspeed.config_file {ds.config_file} sets {key}={extra[key]}, "
                    f"but the trainer config gives {config[key]}; set it in one place"
                )
        zero_extra = extra.pop("zero_optimization", {})
        if zero_extra.get("stage", ds.zero_stage) != ds.zero_stage:
            raise ConfigError(
                f"trainer.deepspeed.config_file {ds.config_file} sets zero_optimization.stage="
                f"{zero_extra['stage']}, but trainer.deepspeed.zero_stage={ds.zero_stage}; "
                f"set it in one place"
            )
        for key, name, ours in (
            ("offload_optimizer", "offload_optimizer", ds.offload_optimizer),
            ("offload_param", "offload_params", ds.offload_params),
        ):
            device = (zero_extra.get(key) or {}).get("device", "none")
            if (device != "none") != ours:
                raise ConfigError(
                    f"trainer.deepspeed.config_file {ds.config_file} sets zero_optimization."
                    f"{key}.device={device}, but trainer.deepspeed.{name}={ours}; set it "
                    f"in one place"
                )
        zero.update(zero_extra)  # deep enough: zero_optimization is the only nested section we set
        config.update(extra)
    world = dist.get_world_size() if dist.is_initialized() else None
    want = micro_batch * trainer_cfg.grad_accum_steps * world if world else None
    if want and config.get("train_batch_size", want) != want:
        raise ConfigError(
            f"trainer.deepspeed.config_file sets train_batch_size={config['train_batch_size']}, "
            f"but data.batch_size={micro_batch} x trainer.grad_accum_steps="
            f"{trainer_cfg.grad_accum_steps} x {world} ranks = {want}; set it in one place"
        )
    return config


def engine_via(ds_cfg) -> str:
    """'accelerate' or 'native': who builds the engine (`auto`: Accelerate when `accelerate
    launch` was given a DeepSpeed config, i.e. ACCELERATE_USE_DEEPSPEED=true)."""
    if ds_cfg.via != "auto":
        return ds_cfg.via
    return "accelerate" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else "native"


def check_accelerate_launch_env(ds_cfg) -> None:
    """An accelerate DeepSpeed YAML that contradicts the recipe is an error, not a silent
    winner: the recipe decides, the YAML may only agree."""
    env = os.environ
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage not in (None, "") and int(stage) != ds_cfg.zero_stage:
        raise ConfigError(
            f"accelerate launch config says zero_stage={stage}, the recipe's "
            f"trainer.deepspeed.zero_stage={ds_cfg.zero_stage}; make them agree"
        )
    for key, ours in (
        ("OFFLOAD_OPTIMIZER_DEVICE", ds_cfg.offload_optimizer),
        ("OFFLOAD_PARAM_DEVICE", ds_cfg.offload_params),
    ):
        theirs = env.get(f"ACCELERATE_DEEPSPEED_{key}", "none").lower()
        if theirs not in ("", "none") and (theirs == "cpu") != ours:
            name = "offload_optimizer" if "OPTIM" in key else "offload_params"
            raise ConfigError(
                f"accelerate launch config says {key.lower()}={theirs}, the recipe's "
                f"trainer.deepspeed.{name}={ours}; make them agree"
            )
    theirs = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if theirs not in ("", "none") and not (
        ds_cfg.config_file and Path(ds_cfg.config_file).resolve() == Path(theirs).resolve()
    ):
        raise ConfigError(
            f"accelerate launch config names deepspeed_config_file={theirs}; name it in "
            f"the recipe instead (trainer.deepspeed.config_file), which decides"
        )


def convert_to_universal(src: Path, dst: Path) -> str | None:
    """DeepSpeed's ds_to_universal on one rank's behalf (a subprocess: it forks worker pools);
    None on success, else the converter's output tail."""
    shutil.rmtree(dst.parent, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(src),
        "--output_folder",
        str(dst),
        "--num_extract_workers",
        "2",
        "--num_merge_workers",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        shutil.rmtree(dst.parent, ignore_errors=True)
        return (out.stdout + out.stderr)[-3000:]
    return None


class DeepSpeedBackend:
    def __init__(self, trainer_cfg, micro_batch: int):
        import deepspeed

        check_accelerate_launch_env(trainer_cfg.deepspeed)
        self.cfg, self.micro_batch = trainer_cfg, micro_batch
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(
            dist_backend=backend, verbose=False, timeout=timedelta(seconds=trainer_cfg.dist_timeout_s)
        )
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.stage = trainer_cfg.deepspeed.zero_stage
        self.shards_params = self.stage == 3  # forward is collective: all ranks must run it
        self.name = f"DeepSpeed ZeRO-{self.stage}, engine built by deepspeed.initialize"
        self._pending = 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(self.cfg, self.micro_batch)
        )
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

    def step(
        self, model: nn.Module, optimizer: Any, max_norm: float, skip_nonfinite: bool = False, measure: bool = True
    ) -> torch.Tensor:
        """Optimizer step at the boundary (clipping is the engine's); the global grad norm
        (the engine computes it every step anyway, so `measure` changes nothing)."""
        self.engine.step()
        self._pending = 0
        norm = self.engine.get_global_grad_norm()  # a tensor or a float, by stage and version
        if isinstance(norm, torch.Tensor):
            return norm.detach().reshape(()).to(self.device)  # no host sync
        return torch.tensor(float(norm) if norm is not None else float("nan"), device=self.device)

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

    # ---------------------------------------------------------------- checkpoints
    checkpoint_layout = "deepspeed"

    def full_tensors(self, model: nn.Module):
        """(name, whole tensor on the CPU) of every model tensor, one at a time, on rank 0
        (None elsewhere). ZeRO-3 gathers one parameter at a time (collective)."""
        net = self.unwrap(model)
        if self.stage == 3:
            import deepspeed

            for name, tensor in net.state_dict(keep_vars=True).items():
                partitioned = hasattr(tensor, "ds_id")  # buffers are whole on every rank
                with deepspeed.zero.GatheredParameters([tensor]) if partitioned else contextlib.nullcontext():
                    yield name, tensor.detach().cpu().clone() if self.is_main else None
        elif self.is_main:
            for name, tensor in net.state_dict().items():
                yield name, tensor.detach().cpu().clone()

    def load_exported(self, model: nn.Module, path: Path, *, group) -> None:
        """Load a safetensors export (trainer/export.py) into the (possibly partitioned) model,
        a tensor at a time. Collective."""
        from safetensors import safe_open

        from trainer.export import check_shapes, exported_files

        net = self.unwrap(model)
        files = exported_files(path)
        if self.stage != 3:
            check_shapes(path, net)
            for f in sorted(set(files.values())):
                net.load_state_dict(load_file(str(f)), strict=False)
            return
        import deepspeed

        for name, tensor in net.state_dict(keep_vars=True).items():
            if name not in files:
                raise KeyError(f"{path}: the export has no '{name}'")
            if hasattr(tensor, "ds_id"):
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                    if self.is_main:
                        with safe_open(str(files[name]), framework="pt") as f:
                            tensor.data.copy_(f.get_tensor(name))
            else:
                with safe_open(str(files[name]), framework="pt") as f:
                    tensor.data.copy_(f.get_tensor(name))

    def checkpoint_writer(self, path: Path, model: nn.Module, optimizer: Any, *, step: int, group, stage: bool):
        """DeepSpeed's engine checkpoint, every rank writing its partition. The whole weights
        are gathered beside it only with trainer.deepspeed.save_full_weights."""
        if stage:
            raise ValueError(
                "a DeepSpeed engine writes its checkpoint synchronously "
                "(trainer.checkpoint_async needs trainer.backend=accelerate)"
            )

        def write() -> list[str]:
            # the marker below lets universal conversion (another world size) work
            self.engine.save_checkpoint(
                str(path), tag=DS_TAG, save_latest=False, client_state={"universal_checkpoint_info": {}}
            )
            if self.cfg.deepspeed.save_full_weights:
                from trainer.export import SafetensorsShards

                # rank 0 keeps gathering after a write error, so that no rank waits in a gather;
                # the checkpointer's vote then fails every rank
                error = None
                shards = SafetensorsShards(path, self.cfg.export_max_shard_size) if self.is_main else None
                for name, tensor in self.full_tensors(model):
                    if shards is not None and error is None:
                        try:
                            shards.add(name, tensor)
                        except OSError as exc:
                            error = exc
                if shards is not None and error is None:
                    shards.close()
                if error is not None:
                    raise error
            return self.owned_files(path)

        return write

    def owned_files(self, path: Path) -> list[str]:
        """What this rank wrote: its `zero_pp_rank_<R>_` partition files; rank 0 also the rest
        (the engine's model states, the recovery script, the gathered weights)."""
        per_rank = re.compile(r"zero_pp_rank_(\d+)_")
        ours = re.compile(r"^(rng|data)-rank\d+\.")
        mine = []
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            m = per_rank.search(f.name)
            if (m and int(m.group(1)) == self.rank) or (not m and self.is_main and not ours.match(f.name)):
                mine.append(f.relative_to(path).as_posix())
        return mine

    def load_model_and_optimizer(self, path: Path, model: nn.Module, optimizer: Any, *, group=None) -> None:
        if not (path / DS_TAG).is_dir():
            from trainer.checkpoint import IncompatibleCheckpointError

            raise IncompatibleCheckpointError(
                f"{path} holds no DeepSpeed engine state ({DS_TAG}/): it was written by the Accelerate "
                "backend; resume it with trainer.backend=accelerate (DDP or FSDP2), or export its weights "
                "(python -m launch.export) and start a new run from them"
            )
        saved_ranks = len(list((path / DS_TAG).glob("*optim_states.pt")))
        if not saved_ranks or saved_ranks == self.world_size:
            self._load(path, DS_TAG)
            return
        # another world size: DeepSpeed's universal checkpoint (per-parameter fp32 weights and
        # Adam moments, re-partitioned on load). Converted next to the checkpoint, which stays
        # as written, and removed once every rank has loaded it.
        universal = path.parent / f".{path.name}.universal-{self.world_size}"
        error = None
        if self.is_main:
            error = convert_to_universal(path / DS_TAG, universal / DS_TAG)
        error = self.broadcast_object(error)
        if error:
            raise RuntimeError(
                f"{path}: written by {saved_ranks} DeepSpeed ranks, this run has "
                f"{self.world_size}; converting it to a universal checkpoint failed:\n{error}"
            )
        self.engine._config.load_universal_checkpoint = True
        try:
            self._load(universal, DS_TAG)
            # DeepSpeed 0.19.8's ZeRO-3 universal load gives every parameter group the *same*
            # `step` tensor; torch's Adam increments it in place once per group, so the second
            # group would take its bias correction one step ahead. One tensor per group.
            inner = getattr(self.engine.optimizer, "optimizer", None)
            for state in inner.state.values() if inner is not None else []:
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        finally:
            self.engine._config.load_universal_checkpoint = False
            self.barrier()
            if self.is_main:
                shutil.rmtree(universal, ignore_errors=True)

    def _load(self, path: Path, tag: str) -> None:
        with weights_only_torch_load():
            load_path, _ = self.engine.load_checkpoint(
                str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed found no engine checkpoint under '{tag}/'")

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def end(self) -> None:
        if dist.is_initialized():
            dist.barrier()


class AccelerateDeepSpeedBackend(DeepSpeedBackend):
    """The same engine built through Accelerate's DeepSpeed plugin. Its config is ours
    (`deepspeed_config`), so the recipe stays the one source; checkpoints, exports and
    logs are the native backend's. Accelerate steps the engine inside `backward` at the
    accumulation boundary, so `step` only reads the norm."""

    def __init__(self, trainer_cfg, micro_batch: int):
        from accelerate import Accelerator, DeepSpeedPlugin
        from accelerate.utils import InitProcessGroupKwargs

        check_accelerate_launch_env(trainer_cfg.deepspeed)
        # the YAML's DeepSpeed keys agree with the recipe (checked above); the plugin would
        # refuse them beside a config of ours, as if they could disagree
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        self.cfg, self.micro_batch = trainer_cfg, micro_batch
        self.stage = trainer_cfg.deepspeed.zero_stage
        self.shards_params = self.stage == 3
        self.name = f"DeepSpeed ZeRO-{self.stage}, engine built by Accelerate's DeepSpeed plugin"
        self._pending = 0
        # gloo named explicitly on CPU, or Accelerate's DeepSpeed state fails its batch-size
        # check (docs/platform-notes.md)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        kwargs = InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=trainer_cfg.dist_timeout_s))
        plugin = DeepSpeedPlugin(
            hf_ds_config=deepspeed_config(trainer_cfg, micro_batch),
            gradient_accumulation_steps=trainer_cfg.grad_accum_steps,
        )
        self.accelerator = Accelerator(
            deepspeed_plugin=plugin,
            mixed_precision=trainer_cfg.mixed_precision,
            gradient_accumulation_steps=trainer_cfg.grad_accum_steps,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[kwargs],
        )
        state = self.accelerator.state
        self.rank, self.world_size = state.process_index, state.num_processes
        self.is_main = self.accelerator.is_main_process
        device = self.accelerator.device  # "cpu:0" is refused by torch.load (docs/platform-notes.md)
        self.device = torch.device("cpu") if device.type == "cpu" else device

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.engine = self.accelerator.deepspeed_engine_wrapped.engine
        return model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self._pending += 1
        boundary = self._pending >= self.cfg.grad_accum_steps
        self.accelerator.gradient_state._set_sync_gradients(boundary)
        # the loop already divided the loss by the accumulation steps
        self.accelerator.backward(loss, scale_wrt_gas=False)

    def step(
        self, model: nn.Module, optimizer: Any, max_norm: float, skip_nonfinite: bool = False, measure: bool = True
    ) -> torch.Tensor:
        self._pending = 0  # the engine stepped (and clipped) inside backward
        norm = self.engine.get_global_grad_norm()  # a tensor or a float, by stage and version
        if isinstance(norm, torch.Tensor):
            return norm.detach().reshape(()).to(self.device)  # no host sync
        return torch.tensor(float(norm) if norm is not None else float("nan"), device=self.device)

    def end(self) -> None:
        self.accelerator.end_training()
