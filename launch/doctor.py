"""Preflight: check a recipe against the planned launch before the job waits in a queue.

    python -m launch.doctor --config configs/autoregressive/made.yaml --nodes 2 --gpus-per-node 4
    python -m launch.doctor --config configs/lm/causal_4k.yaml --procs-per-node 2 run.dir=/scratch/lm

One line per check (ok / warn / FAIL, naming the config key, shard or folder at fault):
the config; the global batch at this world size; every split's shards (there, readable,
enough for ranks x workers) and how many steps an epoch gives; room in run.dir for
trainer.keep_last_k + 1 checkpoints and the best export; a rough memory per rank for the
backend (fp32 weights, grads and AdamW state; activations excluded). Reads nothing remote.

Exit codes: 0 no FAIL (warnings allowed); 1 some check failed; 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from data_pipelines.stream import DataError, _is_local, check_readers, resolve_shards
from trainer.config import ConfigError, load_config, resolve_global_batch, training_splits

Say = Callable[[str, str, str], None]  # (level, check, message)
OVERHEAD, PER_RANK = 64_000, 32_000  # scheduler and trainer state; RNG and data position per rank


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def memory_per_rank(trainer_cfg, params: int, world: int, trainable: Optional[int] = None) -> tuple[float, float]:
    """(device, host) bytes per rank for fp32 weights (4P), grads (4P) and AdamW state (8P);
    frozen parameters have no grads or optimizer state."""
    trainable = params if trainable is None else trainable
    weights, grads, optim = 4.0 * params, 4.0 * trainable, 8.0 * trainable
    if trainer_cfg.backend == "accelerate":
        share = world if trainer_cfg.accelerate.strategy == "fsdp" else 1
        return (weights + grads + optim) / share, 0.0
    ds = trainer_cfg.deepspeed
    optim /= world if ds.zero_stage >= 1 else 1
    grads /= world if ds.zero_stage >= 2 else 1
    weights /= world if ds.zero_stage == 3 else 1
    host = (optim if ds.offload_optimizer else 0.0) + (weights if ds.offload_params else 0.0)
    return weights + grads + optim - host, host


def count_params(model_cfg) -> tuple[int, int]:
    """(all, trainable) parameters, built on the meta device: no memory, no init time."""
    import torch

    from models.registry import build_workload

    try:
        with torch.device("meta"):
            model = build_workload(model_cfg).build_model()
    except Exception:  # a model that reads its init from disk or needs real tensors
        model = build_workload(model_cfg).build_model()
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def check_batch(cfg, world: int, say: Say) -> Optional[int]:
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
            from trainer.backends.deepspeed import deepspeed_config

            theirs = deepspeed_config(t, d.batch_size).get("train_batch_size", glob)
            if theirs != glob:
                raise ConfigError(f"config key 'trainer.deepspeed.config_file': {t.deepspeed.config_file} "
                                  f"sets train_batch_size={theirs}, but data.batch_size={d.batch_size} x "
                                  f"trainer.grad_accum_steps={t.grad_accum_steps} x {world} rank(s) = {glob}; "
                                  f"set it in one place")
    except ConfigError as exc:
        say("FAIL", "batch", str(exc))
        return None
    except ValueError as exc:  # json.JSONDecodeError
        say("FAIL", "batch", f"config key 'trainer.deepspeed.config_file': {t.deepspeed.config_file} "
            f"is not valid JSON ({exc})")
        return None
    say("ok", "batch", f"global batch {glob} = data.batch_size {d.batch_size} x "
        f"trainer.grad_accum_steps {t.grad_accum_steps} x {world} rank(s)")
    return glob


def check_shards(cfg, world: int, global_batch: Optional[int], say: Say) -> None:
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
            say("FAIL", "data", f"{key}: {len(unreadable)} shard(s) unreadable: {', '.join(unreadable[:3])}"
                + (" ..." if len(unreadable) > 3 else ""))
            continue
        n = shards.total_samples
        text = f"{key}: {len(shards.urls)} shard(s), {n if n is not None else 'unknown (no manifest)'} samples"
        if key in train_keys:
            text += f", {world * max(1, d.num_workers)} reader(s)"
            if n and global_batch:
                steps = n / (global_batch * split.weight / total_weight)
                text += (f"; one epoch ~ {steps:,.0f} step(s) at global batch {global_batch} "
                         f"(trainer.max_steps={cfg.trainer.max_steps} ~ {cfg.trainer.max_steps / steps:,.1f} epochs)")
        say("ok", "data", text)
        if len(local) < len(shards.urls):
            say("warn", "data", f"{key}: {len(shards.urls) - len(local)} remote shard(s) "
                f"(http, s3, pipe:, ...) not checked: the doctor fetches nothing")


def checkpoint_bytes(trainer_cfg, params: int, trainable: int, world: int) -> float:
    """Weights (4P) + AdamW moments (8P), spread over the ranks' shard files; a DeepSpeed
    engine adds, from ZeRO-1 on, its fp32 master partitions, and save_full_weights one more
    copy of the weights."""
    size = 4 * params + 8 * trainable
    if trainer_cfg.backend == "deepspeed":
        ds = trainer_cfg.deepspeed
        size += (4 * trainable if ds.zero_stage >= 1 else 0) + (4 * params if ds.save_full_weights else 0)
    return size + OVERHEAD + PER_RANK * world


def check_run_dir(cfg, params: Optional[tuple[int, int]], world: int, say: Say) -> None:
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
    say("ok", "run.dir", f"'{run_dir}' is writable" if there == run_dir else
        f"'{run_dir}' will be made in '{there}', which is writable")

    root = run_dir / "checkpoints"
    existing = complete_checkpoints(root)
    resume_from = None
    if t.resume == "auto":
        resume_from = latest(root)
    elif t.resume != "never":
        resume_from = Path(t.resume)
    if resume_from is not None:
        say("ok", "resume", f"trainer.resume={t.resume}: the run continues from '{resume_from}'")
        per_ckpt = sum(p.stat().st_size for p in resume_from.rglob("*") if p.is_file())
    elif params is None:
        say("warn", "disk", "checkpoint size unknown (the model did not build); disk room not checked")
        return
    else:
        per_ckpt = checkpoint_bytes(t, *params, world)
    if existing and t.resume == "never":
        say("warn", "resume", f"trainer.resume=never, but '{root}' holds checkpoints up to "
            f"'{existing[-1].name}': pruning keeps the highest steps, and a later auto resume picks them")
    # one more than keep_last_k is on disk while the oldest waits to be pruned
    count = max(1, t.keep_last_k + 1 - len(existing))
    best = 4 * params[0] if params and cfg.data.val.urls and not (run_dir / "best").exists() else 0
    need, free = count * per_ckpt + best, shutil.disk_usage(there).free
    text = (f"{count} new checkpoint(s) of ~{_size(per_ckpt)} (trainer.keep_last_k={t.keep_last_k}, +1 "
            f"until the oldest is pruned)" + (f" + best export {_size(best)}" if best else "") +
            f" = {_size(need)}; {_size(free)} free under '{there}'")
    say("ok" if need <= free else "FAIL", "disk", text if need <= free else f"run.dir: not enough room: {text}")


def check_memory(cfg, params: tuple[int, int], world: int, gpu_mem_gb: Optional[float], say: Say) -> None:
    t = cfg.trainer
    device, host = memory_per_rank(t, params[0], world, params[1])
    ds = t.deepspeed
    offloaded = [name for name, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params)) if on]
    what = (f"accelerate {t.accelerate.strategy}" if t.backend == "accelerate" else
            f"deepspeed zero-{ds.zero_stage}" + (f" ({' and '.join(offloaded)} offloaded)" if offloaded else ""))
    frozen = f" ({params[0] - params[1]:,} frozen)" if params[1] < params[0] else ""
    text = (f"{params[0]:,} params{frozen}, {what} on {world} rank(s): ~{_size(device)} per rank on its device"
            + (f" + {_size(host)} in host memory" if host else "")
            + " for weights, grads and AdamW state (activations not included)")
    if gpu_mem_gb and device > 0.8 * gpu_mem_gb * 1e9:
        say("warn", "memory", f"{text}: over 80% of --gpu-mem-gb {gpu_mem_gb:g}")
    else:
        say("ok", "memory", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        say("FAIL", "config", str(exc))
    else:
        say("ok", "config", f"{args.config}: workload {cfg.model.name}, backend {cfg.trainer.backend}")
        global_batch = check_batch(cfg, world, say)
        check_shards(cfg, world, global_batch, say)
        try:
            params = count_params(cfg.model)
        except Exception as exc:
            params = None
            say("FAIL", "model", f"model.name={cfg.model.name} does not build: {type(exc).__name__}: {exc}")
        check_run_dir(cfg, params, world, say)
        if params:
            check_memory(cfg, params, world, args.gpu_mem_gb, say)
    if problems:
        print(f"verdict: {problems} problem(s); fix them before submitting")
        return 1
    print(f"verdict: ready to launch on {args.nodes} node(s) x {per_node} {unit} = {world} rank(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
