"""Preflight: check a recipe against the planned launch before the job waits in a queue.

    python -m launch.doctor --config configs/autoregressive/made.yaml --nodes 2 --gpus-per-node 4
    python -m launch.doctor --config configs/lm/causal_4k.yaml --procs-per-node 2 run.dir=/scratch/lm

One line per check (ok / warn / FAIL, naming the config key, shard or folder at fault):
the config; the global batch at this world size; every split's shards (there, readable,
enough for ranks x workers) and how many steps an epoch gives; room in run.dir for
trainer.keep_last_k + 1 checkpoints and the best export; a rough memory per rank for the
backend (weights, grads, AdamW state, DeepSpeed's fp32 master copy and the reduction buffers
that live as long; frozen parameters as weights only, an EMA copy as one more set of weights),
each number naming its estimator: DeepSpeed's own where it has one, ours elsewhere.
Activations are left out, except the SD workload's UNet's, measured on the meta device
(models/sd/memory.py). Reads nothing remote.

Exit codes: 0 no FAIL (warnings allowed); 1 some check failed; 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from data_pipelines.stream import DataError, _is_local, check_readers, resolve_shards
from launch.cli import program
from launch.recipes import load_recipe
from trainer.config import ConfigError, resolve_global_batch, training_splits

Say = Callable[[str, str, str], None]  # (level, check, message)
OVERHEAD, PER_RANK = 64_000, 32_000  # scheduler and trainer state; RNG and data position per rank


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


class Group(NamedTuple):
    """A top-level submodule's parameters: a latent diffusion model's unet, vae, text_encoder, ema_unet."""

    name: str
    trainable: int
    frozen: int


class ModelSize(NamedTuple):
    total: int
    trainable: int
    largest_layer: int  # one module's own parameters, the most of any: ZeRO-3 gathers a module at a time
    numels: tuple[int, ...]  # each parameter's size, in model order: ZeRO-3 keeps the small ones whole
    groups: tuple[Group, ...] = ()  # by top-level submodule; one named ema or ema_* is an EMA copy


# how the memory line names a model's submodules; others by their attribute name
LABELS = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "ema_unet": "UNet", "ema_lora": "LoRA adapters"}


class Layout(NamedTuple):
    """A model's parameters as the memory line names them: what trains, what is frozen
    (weights only: no grads, no AdamW state), and an EMA copy (weights only)."""

    trained: str  # "UNet", "UNet LoRA adapters"
    frozen: str  # "VAE+text encoder", "VAE+text encoder+base UNet"
    frozen_params: int
    ema: str
    ema_params: int


def is_ema(group: Group) -> bool:
    return group.name == "ema" or group.name.startswith("ema_")


def label(group: Group) -> str:
    return LABELS.get(group.name, group.name)


def layout(size: ModelSize) -> Layout | None:
    """None for a model whose parameters all train and which keeps no EMA: one line part."""
    if size.trainable == size.total or not size.groups:
        return None
    ema = [g for g in size.groups if is_ema(g)]
    rest = [g for g in size.groups if not is_ema(g)]
    trained = [label(g) + (" LoRA adapters" if g.frozen and g.name == "unet" else "") for g in rest if g.trainable]
    frozen = [("base " if g.trainable else "") + label(g) for g in rest if g.frozen]
    ema_params = sum(g.trainable + g.frozen for g in ema)
    return Layout(
        "+".join(trained) or "trained",
        "+".join(frozen) or "weights",
        size.total - size.trainable - ema_params,
        "+".join(label(g) for g in ema),
        ema_params,
    )


def frozen_bytes(trainer_cfg, model_cfg) -> int:
    """Bytes per frozen weight under Accelerate: 16-bit under bf16/fp16 when the workload stores
    its frozen parts so (the SD workload's `model.frozen_dtype: auto`), else fp32."""
    sixteen = trainer_cfg.mixed_precision in ("bf16", "fp16")
    return 2 if sixteen and getattr(model_cfg, "frozen_dtype", "fp32") == "auto" else 4


class Part(NamedTuple):
    place: str  # "device" or "host"
    what: str
    bytes: float
    by: str  # the estimator that gave the number: OURS or DeepSpeed's function


OURS = "ours"


def memory_per_rank(
    trainer_cfg, size: ModelSize, nodes: int, per_node: int, cpu_ranks: bool = False, zero=None, model_cfg=None
) -> list[Part]:
    """What one rank holds from step to step, part by part: weights, grads, AdamW state,
    DeepSpeed's fp32 master partition, and the reduction buffers that stay allocated (DDP's
    buckets, ZeRO-3's reduce bucket). Activations and buffers that live only inside backward
    are left out. `zero`: the engine's DeepSpeedZeroConfig (bucket sizes, thresholds;
    DeepSpeed's defaults when None); `cpu_ranks`: a buffer counts only the pages it touches,
    not its whole allocation as on a GPU; `model_cfg`: the workload's keys on frozen weights and
    the EMA (`frozen_dtype`, `ema_offload`; absent: fp32, on the device).

    Frozen parameters hold weights only, an EMA copy (a submodule named ema_*) fp32 weights only:
    4 B a weight, 2 B for frozen ones stored in 16-bit (frozen_bytes); what trains 16 B (fp32
    weights, grads, AdamW's two moments)."""
    world = nodes * per_node
    P, T = size.total, size.trainable
    parts_of = layout(size)
    if trainer_cfg.backend == "accelerate" and parts_of:
        return accelerate_parts(trainer_cfg, parts_of, T, world, model_cfg)
    if trainer_cfg.backend == "accelerate":  # Accelerate keeps fp32 weights under mixed precision (autocast)
        if trainer_cfg.accelerate.strategy == "fsdp":
            return [Part("device", "fp32 weights, grads and AdamW state, sharded", (4 * P + 12 * T) / world, OURS)]
        parts = [Part("device", "fp32 weights, grads and AdamW state", 4 * P + 12 * T, OURS)]
        if world > 1:  # a group of one is unwrapped (trainer/backends/accelerate.py)
            # torch DDP's default (no gradient_as_bucket_view): buckets of its own beside .grad,
            # 25 MB each, together as large as the trained parameters
            parts.append(Part("device", "DDP gradient buckets", 4 * T, OURS))
        return parts
    return deepspeed_memory(trainer_cfg, size, nodes, per_node, cpu_ranks, zero, model_cfg)


def accelerate_parts(trainer_cfg, parts_of: Layout, T: int, world: int, model_cfg) -> list[Part]:
    """DDP or FSDP2 over a model with frozen parts and an EMA, part by part. FSDP2 shards every
    submodule, the frozen ones and the EMA copy included (trainer/backends/accelerate.py, fsdp_units)."""
    fsdp = trainer_cfg.accelerate.strategy == "fsdp"
    share, sharded = (world, ", sharded") if fsdp else (1, "")
    wf = frozen_bytes(trainer_cfg, model_cfg)
    parts = [Part("device", f"{parts_of.trained} fp32 weights, grads and AdamW state{sharded}", 16 * T / share, OURS)]
    if parts_of.frozen_params:
        dtype = trainer_cfg.mixed_precision if wf == 2 else "fp32"
        parts.append(
            Part("device", f"frozen {parts_of.frozen} ({dtype}){sharded}", wf * parts_of.frozen_params / share, OURS)
        )
    if parts_of.ema_params:
        at = "host" if getattr(model_cfg, "ema_offload", False) else "device"
        parts.append(Part(at, f"EMA of the {parts_of.ema} (fp32){sharded}", 4 * parts_of.ema_params / share, OURS))
    if world > 1 and not fsdp:
        parts.append(Part("device", "DDP gradient buckets", 4 * T, OURS))
    return parts


def import_deepspeed() -> None:
    """Import DeepSpeed with its log on stderr. Its logger writes to the stdout of the moment it
    is made (on import, with a line about which accelerator it guessed), and the report is stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401


def deepspeed_memory(
    trainer_cfg, size: ModelSize, nodes: int, per_node: int, cpu_ranks: bool, zero, model_cfg=None
) -> list[Part]:
    """The DeepSpeed engine's parts. Ours first, as the engine allocates them
    (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py); where DeepSpeed's own estimator covers
    a 16-bit layout, its number replaces the parts it counts."""
    import_deepspeed()
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds, world = trainer_cfg.deepspeed, nodes * per_node
    stage, P, T = ds.zero_stage, size.total, size.trainable
    zero = zero or DeepSpeedZeroConfig(stage=stage)
    w = 4 if trainer_cfg.mixed_precision == "no" else 2  # the engine casts the module to bf16/fp16
    opt_at = "host" if ds.offload_optimizer else "device"
    opt_share = world if stage >= 1 else 1
    weight_share = world if stage == 3 else 1
    # stage 1 reduces and frees the grads at each boundary, as stage 2 does; with accumulation
    # it keeps them whole in between (benchmarks/RESULTS.md, zero_memory)
    accumulating = stage == 1 and trainer_cfg.grad_accum_steps > 1
    parts = [Part("host" if ds.offload_params else "device", "weights", w * T / weight_share, OURS)]
    # (P - T: frozen weights and any EMA copy, counted below)
    weights_at = "host" if ds.offload_params else "device"
    parts_of = layout(size)
    if parts_of:  # the engine casts the whole module's parameters, frozen parts too
        if parts_of.frozen_params:
            parts.append(Part(weights_at, f"frozen {parts_of.frozen}", w * parts_of.frozen_params / weight_share, OURS))
        if parts_of.ema_params:  # fp32: the SD workload holds it as buffers, which the cast leaves be
            at = "host" if getattr(model_cfg, "ema_offload", False) else weights_at
            parts.append(Part(at, f"EMA of the {parts_of.ema} (fp32)", 4 * parts_of.ema_params / weight_share, OURS))
    elif P > T:
        parts.append(Part(weights_at, "frozen weights", w * (P - T) / weight_share, OURS))
    if w == 2 or stage >= 1:  # DeepSpeed clones the fp32 master even from fp32 weights
        parts.append(Part(opt_at, "fp32 master", 4 * T / opt_share, OURS))
    whole = stage == 0 or accumulating  # grads at full size on every rank
    if whole:
        parts.append(Part("device", "grads" if stage == 0 else "whole grads between micro-steps", w * T, OURS))
    if w == 2 and not whole and not ds.offload_optimizer:  # the reduced partition (offload: straight to the host)
        parts.append(Part("device", "16-bit grads", 2 * T / world, OURS))
    if w == 2 or not whole:  # the fp32 grads the step reads: the partition's copy, or (fp32) the partition
        parts.append(Part(opt_at, "fp32 grads", 4 * T / opt_share, OURS))
    parts.append(Part(opt_at, "AdamW state", 8 * T / opt_share, OURS))
    if stage == 3:
        # one module's weights and grads at full size, as DeepSpeed's estimator counts them
        parts.append(Part("device", "gathered largest layer", 2 * w * size.largest_layer, OURS))
        kept = 0  # parameter_offload.py, mark_persistent_parameters
        for n in size.numels:
            if n <= zero.param_persistence_threshold and kept + n <= zero.model_persistence_threshold:
                kept += n
        if kept:
            parts.append(Part("device", "whole small params", w * kept, OURS))
        if zero.contiguous_gradients:  # allocated once at start, one per communication dtype
            bucket = min(zero.reduce_bucket_size, T) if cpu_ranks else zero.reduce_bucket_size
            parts.append(Part("device", "reduce bucket", w * bucket, OURS))
    if w == 4 or stage == 0 or (stage == 3 and ds.offload_params and not ds.offload_optimizer):
        # DeepSpeed's estimators cover 16-bit weights under ZeRO 1-3, param offload only with the optimizer's
        return parts

    covered = {"weights", "fp32 master", "16-bit grads", "fp32 grads", "AdamW state", "gathered largest layer"}
    theirs = [p for p in parts if p.place == "device" and p.what in covered]
    ours = [p for p in parts if p.place != "device" or p.what not in covered]
    if stage == 3:
        from deepspeed.runtime.zero import stage3

        estimate = stage3.estimate_zero3_model_states_mem_needs
        # zero_init=False: the trainer builds the whole model on every rank, then partitions it
        _, gpu, _ = estimate(
            T,
            size.largest_layer,
            per_node,
            nodes,
            cpu_offload=ds.offload_optimizer,
            cpu_offload_params=ds.offload_params,
            zero_init=False,
        )
    else:
        from deepspeed.runtime.zero import stage_1_and_2

        estimate = stage_1_and_2.estimate_zero2_model_states_mem_needs
        _, gpu = estimate(T, per_node, nodes, cpu_offload=ds.offload_optimizer)
    # the host side stays ours: DeepSpeed's cpu figure is per node, for loading the whole model on each rank
    return [Part("device", ", ".join(p.what for p in theirs), gpu, f"DeepSpeed's {estimate.__name__}"), *ours]


def meta_model(model_cfg):
    """The workload's model on the meta device (no memory, no init time): its `flops_model`,
    which a workload that reads weights from disk builds from its folders' configs alone."""
    from models.registry import build_workload

    return build_workload(model_cfg).flops_model()


def count_params(model_cfg) -> ModelSize:
    """Parameter counts, requires_grad included, of the meta-device model."""
    return model_size(meta_model(model_cfg))


def activations(cfg, model) -> tuple[str, float]:
    """The memory line's word on activations: measured for the SD workload's UNet
    (models/sd/memory.py) at data.batch_size and model.image_size, else not estimated."""
    m, t = cfg.model, cfg.trainer
    if m.name != "sd" or model is None:
        return "activations not included", 0
    import torch

    from models.sd.memory import unet_activation_bytes

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision, torch.float32)
    ckpt = m.activation_checkpointing
    try:
        n = unet_activation_bytes(model.to(dtype), cfg.data.batch_size, m.image_size, ckpt)
    except Exception as exc:  # noqa: BLE001 - a UNet the meta device cannot run: say so, keep the rest
        return f"activations not estimated: the UNet's meta forward failed: {type(exc).__name__}: {exc}", 0
    how = "with" if ckpt else "without"
    extra = ", a trained text encoder's not estimated" if m.train_text_encoder else ""
    return (
        f"+ UNet activations ~{_size(n)} more at its peak, {cfg.data.batch_size} x {m.image_size}px "
        f"a micro-batch, {t.mixed_precision if dtype != torch.float32 else 'fp32'}, {how} "
        f"gradient checkpointing, measured on the meta device{extra}"
    ), n


def check_workload_data(cfg, say: Say) -> None:
    """What the workload itself asks of the shards (an LM: the vocabulary its tokenizer and the
    shards' manifests name), as launch.train checks it at start; silent when it has no objection."""
    from launch.train import split_manifests
    from models.registry import build_workload

    try:
        workload = build_workload(cfg.model)
    except Exception:  # noqa: BLE001 - the model check below reports it
        return
    try:
        workload.check_data(split_manifests(cfg))
    except (ValueError, OSError) as exc:
        say("FAIL", "data", str(exc))


def model_size(model) -> ModelSize:
    params = list(model.parameters())  # each shared parameter once
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    groups = tuple(
        Group(
            name,
            sum(p.numel() for p in child.parameters() if p.requires_grad),
            sum(p.numel() for p in child.parameters() if not p.requires_grad),
        )
        for name, child in model.named_children()
        if any(True for _ in child.parameters())
    )
    return ModelSize(
        sum(p.numel() for p in params),
        sum(p.numel() for p in params if p.requires_grad),
        largest,
        tuple(p.numel() for p in params),
        groups,
    )


def check_batch(cfg, world: int, say: Say) -> int | None:
    """The global batch at `world` ranks, and the launcher / DeepSpeed settings that must agree."""
    from trainer.backends import check_launch_env

    d, t = cfg.data, cfg.trainer
    try:
        resolve_global_batch(cfg, world)
        check_launch_env(t, d.batch_size)
        glob = d.batch_size * t.grad_accum_steps * world
        if t.backend == "deepspeed" and t.deepspeed.config_file:
            # deepspeed_config checks train_batch_size only inside a process group (it asks
            # torch.distributed for the world); here the world is the planned one
            import_deepspeed()
            from trainer.backends.deepspeed import deepspeed_config

            theirs = deepspeed_config(t, d.batch_size).get("train_batch_size", glob)
            if theirs != glob:
                raise ConfigError(
                    f"config key 'trainer.deepspeed.config_file': {t.deepspeed.config_file} "
                    f"sets train_batch_size={theirs}, but data.batch_size={d.batch_size} x "
                    f"trainer.grad_accum_steps={t.grad_accum_steps} x {world} rank(s) = {glob}; "
                    f"set it in one place"
                )
    except ConfigError as exc:
        say("FAIL", "batch", str(exc))
        return None
    except ValueError as exc:  # json.JSONDecodeError
        say(
            "FAIL",
            "batch",
            f"config key 'trainer.deepspeed.config_file': {t.deepspeed.config_file} is not valid JSON ({exc})",
        )
        return None
    say(
        "ok",
        "batch",
        f"global batch {glob} = data.batch_size {d.batch_size} x "
        f"trainer.grad_accum_steps {t.grad_accum_steps} x {world} rank(s)",
    )
    return glob


def check_shards(cfg, world: int, global_batch: int | None, say: Say) -> None:
    d = cfg.data
    training = training_splits(d)
    train_keys = {key for key, _ in training}
    total_weight = sum(split.weight for _, split in training)
    splits = training + [(f"data.{s}.urls", getattr(d, s)) for s in ("val", "test") if getattr(d, s).urls]
    for key, split in splits:
        try:
            shards = resolve_shards(split.urls, split.manifest, key=key)
            if key in train_keys:
                check_readers(len(shards.urls), world, d.num_workers, key=key)
        except DataError as exc:
            say("FAIL", "data", str(exc))
            continue
        local = [u for u in shards.urls if _is_local(u)]
        unreadable = []
        for url in local:
            path = url.removeprefix("file://")
            try:
                if not os.access(path, os.R_OK):
                    raise PermissionError("no read permission")
                with open(path, "rb") as f:
                    f.read(512)
            except OSError as exc:
                unreadable.append(f"'{url}' ({exc.strerror or exc})")
        if unreadable:
            say(
                "FAIL",
                "data",
                f"{key}: {len(unreadable)} shard(s) unreadable: {', '.join(unreadable[:3])}"
                + (" ..." if len(unreadable) > 3 else ""),
            )
            continue
        n = shards.total_samples
        text = f"{key}: {len(shards.urls)} shard(s), {n if n is not None else 'unknown (no manifest)'} samples"
        if key in train_keys:
            text += f", {world * max(1, d.num_workers)} reader(s)"
            if n and global_batch:
                steps = n / (global_batch * split.weight / total_weight)
                text += (
                    f"; one epoch ~ {steps:,.0f} step(s) at global batch {global_batch} "
                    f"(trainer.max_steps={cfg.trainer.max_steps} ~ {cfg.trainer.max_steps / steps:,.1f} epochs)"
                )
        say("ok", "data", text)
        if len(local) < len(shards.urls):
            say(
                "warn",
                "data",
                f"{key}: {len(shards.urls) - len(local)} remote shard(s) "
                f"(http, s3, pipe:, ...) not checked: the doctor fetches nothing",
            )


def checkpoint_bytes(trainer_cfg, params: int, trainable: int, world: int) -> float:
    """Weights (4P) + AdamW moments (8P), spread over the ranks' shard files; a DeepSpeed
    engine adds, from ZeRO-1 on, its fp32 master partitions, and save_full_weights one more
    copy of the weights."""
    size = 4 * params + 8 * trainable
    if trainer_cfg.backend == "deepspeed":
        ds = trainer_cfg.deepspeed
        size += (4 * trainable if ds.zero_stage >= 1 else 0) + (4 * params if ds.save_full_weights else 0)
    return size + OVERHEAD + PER_RANK * world


def check_run_dir(cfg, size: ModelSize | None, world: int, say: Say) -> None:
    from trainer.checkpoint import complete_checkpoints, latest

    run_dir, t = Path(cfg.run.dir), cfg.trainer
    there = run_dir
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir():
        say("FAIL", "run.dir", f"config key 'run.dir': cannot create '{run_dir}': '{there}' is a file, not a folder")
        return
    try:  # as root os.access says yes to everything: try it for real
        fd, probe = tempfile.mkstemp(dir=there, prefix=".doctor-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        say("FAIL", "run.dir", f"config key 'run.dir': cannot write in '{there}' ({exc.strerror or exc})")
        return
    say(
        "ok",
        "run.dir",
        f"'{run_dir}' is writable" if there == run_dir else f"'{run_dir}' will be made in '{there}', which is writable",
    )

    root = run_dir / "checkpoints"
    existing = complete_checkpoints(root)
    resume_from = None
    if t.resume == "auto":
        resume_from = latest(root)
    elif t.resume != "never":
        resume_from = Path(t.resume)
    if resume_from is not None:
        say("ok", "resume", f"trainer.resume={t.resume}: the run continues from '{resume_from}'")
        check_resume(cfg, resume_from, say)
        per_ckpt = sum(p.stat().st_size for p in resume_from.rglob("*") if p.is_file())
    elif size is None:
        say("warn", "disk", "checkpoint size unknown (the model did not build); disk room not checked")
        return
    else:
        per_ckpt = checkpoint_bytes(t, size.total, size.trainable, world)
    check_lock(cfg, say)
    if existing and t.resume == "never":
        say(
            "warn",
            "resume",
            f"trainer.resume=never, but '{root}' holds checkpoints up to "
            f"'{existing[-1].name}': pruning keeps the highest steps, and a later auto resume picks them",
        )
    # one more than keep_last_k is on disk while the oldest waits to be pruned
    count = max(1, t.keep_last_k + 1 - len(existing))
    best = 4 * size.total if size and cfg.data.val.urls and not (run_dir / "best").exists() else 0
    need, free = count * per_ckpt + best, shutil.disk_usage(there).free
    text = (
        f"{count} new checkpoint(s) of ~{_size(per_ckpt)} (trainer.keep_last_k={t.keep_last_k}, +1 "
        f"until the oldest is pruned)"
        + (f" + best export {_size(best)}" if best else "")
        + f" = {_size(need)}; {_size(free)} free under '{there}'"
    )
    say("ok" if need <= free else "FAIL", "disk", text if need <= free else f"run.dir: not enough room: {text}")


def check_resume(cfg, path: Path, say: Say) -> None:
    """The checkpoint's model against this recipe's, as the resume will check it."""
    import torch
    import yaml

    from models.registry import build_workload
    from trainer.checkpoint import IncompatibleCheckpointError, check_resume_model
    from trainer.config import to_yaml

    try:
        with torch.device("meta"):
            model = build_workload(cfg.model).build_model()
    except Exception:  # noqa: BLE001 - the model check above reports a model that does not build
        return
    try:
        changes = check_resume_model(
            path, {n: list(v.shape) for n, v in model.state_dict().items()}, yaml.safe_load(to_yaml(cfg))["model"]
        )
    except IncompatibleCheckpointError as exc:
        say("FAIL", "resume", str(exc))
        return
    if changes:
        say(
            "warn",
            "resume",
            "model.* differs from the checkpoint's, every tensor's shape the same: " + "; ".join(changes),
        )


def check_lock(cfg, say: Say) -> None:
    """Whether another launch writes run.dir now: a launch would be refused."""
    import time

    from trainer.preempt import slurm_job_name
    from trainer.rundir import LOCK, Holder, read_holder, stale_reason

    holder = read_holder(Path(cfg.run.dir) / LOCK)
    if holder is None:
        return
    now = time.time()
    why = stale_reason(holder, Holder.this_process(slurm_job_name(), now), cfg.trainer.lock_stale_s, now)
    if why is None:
        say("FAIL", "run.dir", f"in use by another launch ({holder.describe(now)}); a launch now is refused")
    else:
        say("warn", "run.dir", f"'{LOCK}' of an earlier launch ({holder.describe(now)}) is taken over at start: {why}")


def check_memory(
    cfg,
    size: ModelSize,
    nodes: int,
    per_node: int,
    cpu_ranks: bool,
    gpu_mem_gb: float | None,
    say: Say,
    model=None,
) -> None:
    """`model`: the meta-device model, for a workload whose activations are measured (`activations`)."""
    t, world = cfg.trainer, nodes * per_node
    zero = None
    if t.backend == "deepspeed":
        import_deepspeed()
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        from trainer.backends.deepspeed import deepspeed_config

        try:  # the engine's bucket sizes and thresholds, a config_file's included
            zero = DeepSpeedZeroConfig(**deepspeed_config(t, cfg.data.batch_size)["zero_optimization"])
        except ConfigError:
            say(
                "warn", "memory", "not estimated: trainer.deepspeed.config_file does not load (the batch line says why)"
            )
            return
        except ValueError as exc:  # pydantic's ValidationError: the engine would refuse it at start
            say(
                "FAIL",
                "memory",
                f"config key 'trainer.deepspeed.config_file': {t.deepspeed.config_file}: DeepSpeed "
                f"refuses its zero_optimization: {' '.join(str(exc).splitlines()[1:3])}",
            )
            return
    parts = memory_per_rank(t, size, nodes, per_node, cpu_ranks, zero, cfg.model)
    device, host = (sum(p.bytes for p in parts if p.place == place) for place in ("device", "host"))
    ds = t.deepspeed
    offloaded = [name for name, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params)) if on]
    what = (
        f"accelerate {t.accelerate.strategy}"
        if t.backend == "accelerate"
        else f"deepspeed zero-{ds.zero_stage}" + (f" ({' and '.join(offloaded)} offloaded)" if offloaded else "")
    )
    if t.backend == "deepspeed" and t.mixed_precision != "no":
        what += f", {t.mixed_precision}"
    frozen = f" ({size.total - size.trainable:,} frozen)" if size.trainable < size.total else ""
    acts, act_bytes = activations(cfg, model)

    def listing(place: str) -> str:  # "by DeepSpeed's estimate_...: a 1 MB; by ours: b 2 MB, c 3 MB"
        by = {}
        for p in parts:
            if p.place == place:
                by.setdefault(p.by, []).append(f"{p.what} {_size(p.bytes)}")
        return "; ".join(f"by {name}: {', '.join(items)}" for name, items in by.items())

    text = (
        f"{size.total:,} params{frozen}, {what} on {world} rank(s): ~{_size(device)} per rank on its "
        f"device [{listing('device')}]"
        + (f" + {_size(host)} in host memory [{listing('host')}]" if host else "")
        + f" ({acts})"
    )
    if gpu_mem_gb and device + act_bytes > 0.8 * gpu_mem_gb * 1e9:
        say("warn", "memory", f"{text}: over 80% of --gpu-mem-gb {gpu_mem_gb:g}")
    else:
        say("ok", "memory", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=program("launch.doctor"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/autoregressive/made.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as for launch.train")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the planned job (default 1)")
    parser.add_argument("--gpus-per-node", type=int, help="ranks per node (default 1)")
    parser.add_argument("--procs-per-node", type=int, help="the same, for CPU ranks")
    parser.add_argument("--gpu-mem-gb", type=float, help="memory of one device: warn above 80%% of it")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if args.gpus_per_node is not None and args.procs_per_node is not None:
        parser.error("give --gpus-per-node or --procs-per-node, not both")
    per_node = next((n for n in (args.procs_per_node, args.gpus_per_node) if n is not None), 1)
    if args.nodes < 1 or per_node < 1:
        parser.error("--nodes and --gpus-per-node (--procs-per-node) must be >= 1")
    world = args.nodes * per_node
    unit = "process(es)" if args.procs_per_node else "GPU(s)"

    problems = 0

    def say(level: str, check: str, message: str) -> None:
        nonlocal problems
        problems += level == "FAIL"
        print(f"{level:<5} {check:<8} {message}", flush=True)

    try:
        cfg = load_recipe(args.config, args.overrides)
    except ConfigError as exc:
        say("FAIL", "config", str(exc))
    else:
        say("ok", "config", f"{args.config}: workload {cfg.model.name}, backend {cfg.trainer.backend}")
        global_batch = check_batch(cfg, world, say)
        check_shards(cfg, world, global_batch, say)
        check_workload_data(cfg, say)
        try:
            model = meta_model(cfg.model)
            size = model_size(model)
        except Exception as exc:
            model = size = None
            say("FAIL", "model", f"model.name={cfg.model.name} does not build: {type(exc).__name__}: {exc}")
        check_run_dir(cfg, size, world, say)
        if size:
            check_memory(cfg, size, args.nodes, per_node, args.procs_per_node is not None, args.gpu_mem_gb, say, model)
    if problems:
        print(f"verdict: {problems} problem(s); fix them before submitting")
        return 1
    print(f"verdict: ready to launch on {args.nodes} node(s) x {per_node} {unit} = {world} rank(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
