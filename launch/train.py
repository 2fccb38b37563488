"""The one training entry point.

    python -m launch.train --config configs/autoregressive/made.yaml run.dir=runs/made trainer.max_steps=500

Run it under `accelerate launch`, `torchrun` or `deepspeed` for several processes. The config is read
and checked, and the shards counted against ranks x workers, before any process group
starts, so a bad recipe fails in seconds with the key it is about.

Exit codes: 0 finished; 2 bad config or data layout, a resume from a checkpoint of another
model, or a run.dir another live launch writes (run.dir/lock.json names it); 3 bad data met
while training; 4 another rank died or stopped answering (trainer.dist_timeout_s); 5 a
checkpoint or log could not be written (full disk, read-only run dir; the previous checkpoint
is intact); 6 a NaN/Inf loss under trainer.nonfinite=halt (nothing after the last good
checkpoint is saved); 75 stopped early by SIGUSR1, SIGTERM, Ctrl-C (SIGINT) or the job's time limit, with a complete
checkpoint (under SLURM a SIGUSR1 or time-limit stop also requeues the job); 130 a second Ctrl-C,
or one before training began or after it ended: out at once, nothing more saved.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from data_pipelines.stream import DataError, check_readers, resolve_shards
from launch.cli import program
from launch.recipes import load_recipe
from trainer.config import ConfigError, resolve_global_batch, training_splits
from trainer.preempt import EXIT_INTERRUPTED, EXIT_STOPPED, requeue_slurm_job, slurm_job_name
from trainer.rundir import RunDirLock, RunDirLocked

EXIT_LOST_RANK, EXIT_CHECKPOINT, EXIT_NONFINITE = 4, 5, 6


def lost_peer(exc: BaseException) -> bool:
    """A collective failed because another rank is gone or silent. torch 2.13 raises gloo's
    socket errors and timeouts as plain RuntimeError, so the text decides too."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        s in text
        for s in (
            "third_party/gloo",
            "Connection reset by peer",
            "Connection closed by peer",
            "Timed out waiting",
            "NCCL communicator was aborted",
            "Watchdog caught collective",
        )
    )


def preflight(cfg) -> None:
    """Checks that need no process group: shards exist and can feed every reader."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolve_global_batch(cfg, world)
    d = cfg.data
    for key, split in training_splits(d):
        shards = resolve_shards(split.urls, split.manifest, key=key)
        check_readers(len(shards.urls), world, d.num_workers, key=key)
    for split in ("val", "test"):
        s = getattr(d, split)
        if s.urls:
            resolve_shards(s.urls, s.manifest, key=f"data.{split}.urls")
    from trainer.backends import check_launch_env

    check_launch_env(cfg.trainer, cfg.data.batch_size)


def split_manifests(cfg) -> dict[str, tuple[str, dict]]:
    """Config key of each split's urls -> (path, manifest) of the manifest beside its shards, for
    the workload's data check (`Workload.check_data`); splits without a local manifest are left out."""
    from data_pipelines.shards import read_manifest
    from data_pipelines.stream import manifest_path

    d = cfg.data
    splits = training_splits(d) + [(f"data.{s}.urls", getattr(d, s)) for s in ("val", "test") if getattr(d, s).urls]
    found = {}
    for key, split in splits:
        path = manifest_path(split.urls, split.manifest)
        if path is not None and path.is_file():
            found[key] = (str(path), read_manifest(path))
    return found


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C while no stop agreement listens (setup, the final report): nothing to save
        # that is not saved; the last complete checkpoint, if any, is where a rerun resumes
        print(
            "interrupted (SIGINT) outside the training steps; the last complete checkpoint is kept",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=program("launch.train"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/autoregressive/made.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: trainer.max_steps=100 ...")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from models.registry import build_workload

    try:
        cfg = load_recipe(args.config, args.overrides)
        preflight(cfg)
        workload = build_workload(cfg.model)  # a model.* value it refuses, before any process group
        workload.check_data(split_manifests(cfg))  # data its config cannot read (another vocabulary)
        # one launch per run dir: rank 0 holds it, before any process group (when rank 0 is
        # refused and exits, the launcher stops the other ranks)
        lock = (
            RunDirLock.acquire(Path(cfg.run.dir), cfg.trainer.lock_stale_s, slurm_job=slurm_job_name())
            if os.environ.get("RANK", "0") == "0"
            else None
        )
    except RunDirLocked as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (ConfigError, DataError, ValueError, FileNotFoundError) as exc:
        # Every rank finds the same error. Rank 0 reports it; the others wait a moment
        # first, because a launcher stops all ranks when the first one exits: had rank 1
        # exited first, rank 0 could be stopped before it printed anything.
        rank = os.environ.get("RANK", "0")
        if rank != "0":
            time.sleep(5)
        print(f"error: {exc}" if rank == "0" else f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # the run dir's lock cannot be written (read-only, full)
        print(
            f"error: cannot take the run dir's lock in {exc.filename or 'run.dir'}: {exc.strerror or exc}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_CHECKPOINT

    try:
        return _train(cfg, workload)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, workload) -> int:
    from launch.netif import choose_socket_ifname
    from trainer.backends import make_backend
    from trainer.checkpoint import CheckpointError, IncompatibleCheckpointError, newest_complete
    from trainer.guard import NonFiniteError
    from trainer.loop import Trainer

    ifname = choose_socket_ifname()  # before any process group: see launch/netif.py
    if ifname and os.environ.get("RANK", "0") == "0":
        print(
            f"collectives over {ifname} (the host name resolves to loopback; set GLOO_SOCKET_IFNAME to choose)",
            flush=True,
        )
    backend = make_backend(cfg)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if backend.world_size != launched:
        # e.g. `accelerate launch` with a GPU YAML on a CPU machine without
        # ACCELERATE_USE_CPU=1: each process would train alone and race on one run dir
        print(
            f"error: the launcher started {launched} processes (WORLD_SIZE) but the "
            f"{backend.name} backend formed a group of {backend.world_size}; on a machine "
            f"without GPUs set ACCELERATE_USE_CPU=1 for accelerate launch",
            file=sys.stderr,
            flush=True,
        )
        return 2
    if backend.is_main:
        print(f"backend: {backend.name} on {backend.world_size} rank(s), {backend.device.type}", flush=True)
    stopped, lost = 0, False
    trainer = Trainer(cfg, workload, backend)

    def fail(code: int, message: str, agreed: bool = False) -> int:
        if agreed and not backend.is_main:
            time.sleep(5)  # every rank has this error: let rank 0 say it before a launcher stops it
        print(f"error: rank {backend.rank}: {message}", file=sys.stderr, flush=True)
        return code

    try:
        stopped = trainer.fit().get("stopped", 0)
        if stopped:
            # every rank's part of the checkpoint is on disk (the save ends in a barrier).
            # Rank 0 requeues before anyone leaves: under `srun --kill-on-bad-exit` the first
            # rank to exit gets the others killed.
            if backend.is_main and cfg.trainer.requeue:
                # the requeue makes SLURM SIGTERM this job's processes, rank 0 too: held back
                # until rank 0 has said what it did (then it acts as before)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                try:
                    said = requeue_slurm_job(stopped)
                    if said:
                        print(said, flush=True)
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            backend.barrier()
    except DataError as exc:
        # from a loader worker the message carries the worker's traceback; its last line
        # is the one that names the shard and sample
        message = [line for line in str(exc).splitlines() if line.strip()][-1]
        message = message.split("DataError: ", 1)[-1]
        return fail(3, message)
    except NonFiniteError as exc:
        return fail(EXIT_NONFINITE, str(exc), agreed=True)
    except IncompatibleCheckpointError as exc:  # every rank read the same index
        return fail(2, str(exc), agreed=True)
    except CheckpointError as exc:
        return fail(EXIT_CHECKPOINT, str(exc), agreed=True)
    except OSError as exc:  # e.g. a full disk or a read-only run dir while logging
        kept = newest_complete(Path(cfg.run.dir) / "checkpoints")
        return fail(
            EXIT_CHECKPOINT,
            f"cannot write {exc.filename or cfg.run.dir} (run.dir={cfg.run.dir}): "
            f"{exc.strerror or exc}. Last complete checkpoint: {kept or 'none'}; make room "
            "and rerun the job to resume from it",
        )
    except RuntimeError as exc:
        # gloo: a dead peer resets its sockets at once; a hung one times out. NCCL: the
        # watchdog aborts after the same timeout. Either way this rank cannot go on alone.
        if not lost_peer(exc):
            raise
        lost = True  # no goodbye collectives: the group is broken
        step = getattr(getattr(trainer, "state", None), "step", "?")
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        kept = newest_complete(Path(cfg.run.dir) / "checkpoints")
        return fail(
            EXIT_LOST_RANK,
            f"lost contact with another rank after step {step} (it died, hung "
            f"or lost its network; trainer.dist_timeout_s={cfg.trainer.dist_timeout_s}): "
            f"{first[:300]}. Last complete checkpoint: {kept or 'none'}; rerun the job to "
            "resume from it",
        )
    finally:
        if not lost:
            backend.end()
    return EXIT_STOPPED if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
