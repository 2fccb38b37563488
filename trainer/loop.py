"""The Trainer: the step loop and the few things that hang off it.

Backend-agnostic: it talks to a `Backend` (devices, wrapping, collectives), a `Workload`
(model, loss, metrics, samples), a `StreamLoader` (batches and their position), a
`Checkpointer` and a `MetricsLogger`. The loop asks small components: `TrainStep` (one
optimizer step), `NonFiniteGuard` (the NaN policy), `ThroughputMeter` (rates and MFU),
`StepProfiler` and `Schedule` (what runs after which step).
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import send_to_device

from data_pipelines.buckets import Buckets, generate_buckets
from data_pipelines.image_transforms import ImageTransforms
from data_pipelines.stream import (
    ShardStream,
    Source,
    StreamLoader,
    eval_batches,
    iter_samples,
    resolve_shards,
    truncate_ledgers,
)
from trainer.checkpoint import (
    CONFIG_RECORD,
    MODEL_RECORD,
    Checkpointer,
    CheckpointError,
    check_resume_model,
    newest_complete,
    write_json,
)
from trainer.config import BucketsConfig, RunConfig, bucket_generation, to_yaml, training_splits
from trainer.export import SafetensorsShards
from trainer.faults import failpoint
from trainer.guard import NonFiniteGuard
from trainer.meter import ThroughputMeter, peak_tflops
from trainer.metrics import MetricsLogger, summarize_line
from trainer.preempt import MAX_TIME, REASONS, StopAgreement
from trainer.profiler import StepProfiler
from trainer.rundir import record_launch, write_config_record
from trainer.schedule import Schedule
from trainer.step import TrainStep

SKIP_KINDS = ("bad_samples", "missing_key", "bad_shards", "missing_shards")


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then cosine or flat."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, o) -> torch.optim.Optimizer:
    """AdamW; biases and norm gains (1-D tensors) get no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = resolve_impl(o.impl, decay + no_decay)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **optimizer_impl(impl)
    )


# `optim.impl` -> torch AdamW's (foreach, fused) flags; None lets torch decide
OPTIMIZER_IMPLS = {"auto": (None, None), "for-loop": (False, None), "foreach": (True, None), "fused": (None, True)}
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve_impl(impl: str, params: list[torch.Tensor]) -> str:
    """`auto`: the fused kernel where torch has one for every parameter's device and dtype
    (CUDA, CPU and others; on CPU it ran the optimizer step 4-4.7x faster than torch's own
    default, benchmarks/RESULTS.md speed_features), else what torch picks."""
    if impl != "auto" or not params:
        return impl
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: let it decide
        return "auto"
    if all(p.device.type in devices and p.dtype in FUSED_DTYPES for p in params):
        return "fused"
    return "auto"


def optimizer_impl(impl: str) -> dict:
    foreach, fused = OPTIMIZER_IMPLS[impl]
    return {"foreach": foreach, "fused": fused}


def make_buckets(b: BucketsConfig) -> Buckets | None:
    if not b.enabled:
        return None
    sizes = b.sizes or generate_buckets(**bucket_generation(b))
    return Buckets(tuple((int(w), int(h)) for w, h in sizes))


def build_loader(cfg: RunConfig, workload, rank: int, world_size: int, ledger: Path | None = None) -> StreamLoader:
    """This rank's training batches from every training source of the recipe."""
    d = cfg.data
    sources = [
        Source(resolve_shards(split.urls, split.manifest, key=key), split.weight, key)
        for key, split in training_splits(d)
    ]
    stream = ShardStream(
        sources,
        decode=workload.decode,
        collate=workload.collate,
        batch_size=d.batch_size,
        seed=d.seed,
        shuffle_buffer=d.shuffle_buffer,
        rank=rank,
        world_size=world_size,
        num_workers=d.num_workers,
        on_error=d.on_error,
        resampled=d.resampled,
        with_keys=d.key_ledger,
        buckets=make_buckets(d.buckets),
        transforms=ImageTransforms(**asdict(d.transforms)),
        decode_batch=getattr(workload, "decode_batch", None),  # absent from duck-typed workloads
    )
    return StreamLoader(stream, num_workers=d.num_workers, prefetch_factor=d.prefetch_factor, ledger=ledger)


@dataclass
class TrainState:
    step: int = 0
    train_time_s: float = 0.0
    best_value: float = math.inf
    best_step: int = -1
    skipped_nonfinite: int = 0  # steps left out under trainer.nonfinite=skip


class Trainer:
    def __init__(self, cfg: RunConfig, workload, backend):
        self.cfg, self.workload, self.backend = cfg, workload, backend
        self.run_dir = Path(cfg.run.dir)
        d = cfg.data
        self.val_shards = resolve_shards(d.val.urls, d.val.manifest, key="data.val.urls") if d.val.urls else None
        self.test_shards = resolve_shards(d.test.urls, d.test.manifest, key="data.test.urls") if d.test.urls else None

    # ---------------------------------------------------------------- setup
    def _build(self) -> None:
        cfg, b, t = self.cfg, self.backend, self.cfg.trainer
        seed_all(t.seed)  # identical initial weights on every rank
        self.workload.bind_trainer(t)
        model = self.workload.build_model().to(b.device)
        # names and shapes of the whole model, recorded in each checkpoint for the resume check
        self.model_shapes = {n: list(v.shape) for n, v in model.state_dict().items()}
        if t.compile:
            model.compile()  # in place: the state_dict keys stay those of the plain model
        optimizer = build_optimizer(model, cfg.optim)
        # the kernel flags `auto` resolved to, put back after a resume (a backend may wrap the
        # optimizer in one of its own, DeepSpeed's, which has no `defaults`)
        self.optimizer_flags = {k: optimizer.defaults[k] for k in ("foreach", "fused")}
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            functools.partial(
                lr_factor,
                warmup=cfg.optim.warmup_steps,
                total=t.max_steps,
                schedule=cfg.optim.schedule,
                min_ratio=cfg.optim.min_lr_ratio,
            ),
        )
        self.model, self.optimizer = b.prepare(model, optimizer)
        seed_all(t.seed + 1000 * b.rank)  # per-rank randomness (dropout, noise)

        ledger = None
        if cfg.data.key_ledger:
            (self.run_dir / "ledger").mkdir(parents=True, exist_ok=True)
            ledger = self.run_dir / "ledger" / f"rank{b.rank}.jsonl"
        self.loader = build_loader(cfg, self.workload, b.rank, b.world_size, ledger=ledger)
        self.workload.bind_splits(self._raw_splits())
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints",
            b,
            t.keep_last_k,
            background=t.checkpoint_async,
            timeout_s=t.checkpoint_timeout_s,
        )

    def _raw_splits(self) -> dict:
        """Each split's raw samples in shard order, for what a workload takes from the data."""
        on_error = self.cfg.data.on_error
        sources = {
            "train": self.loader.stream.sources[0].shards if self.loader.stream.sources else None,
            "val": self.val_shards,
            "test": self.test_shards,
        }
        return {
            name: functools.partial(iter_samples, shards.urls, on_error)
            for name, shards in sources.items()
            if shards is not None
        }

    def _resume(self) -> TrainState:
        state = TrainState()
        path = self.checkpointer.resolve(self.cfg.trainer.resume)
        self.resumed_from, self.resume_mode = path, None
        self.resume_changes = []
        if path is not None:
            # another model's checkpoint is refused before anything is loaded, naming the keys
            self.resume_changes = check_resume_model(path, self.model_shapes, yaml.safe_load(self.config_text)["model"])
            trainer_state, data_states = self.checkpointer.load(
                path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
            )
            state = TrainState(**trainer_state)
            for group in self.optimizer.param_groups:  # the checkpoint's flags are the old run's
                group.update(self.optimizer_flags)
            self.resume_mode = self.loader.load_state_dict(data_states)
            if self.resume_mode == "elastic":
                old = data_states[0]
                self.resume_note = (
                    f"elastic: {old['world_size']} rank(s) x {old['num_workers']} "
                    f"worker(s) x batch {old['batch_size']} -> "
                    f"{self.backend.world_size} x {self.loader.stream.num_workers} "
                    f"x {self.cfg.data.batch_size}"
                )
        if self.cfg.data.key_ledger and self.backend.is_main:
            truncate_ledgers(self.run_dir / "ledger", self.loader.total_batches)
        self.backend.barrier()
        return state

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        cfg, t, b = self.cfg, self.cfg.trainer, self.backend
        # the run's record: every launch's config in launches/<n>.yaml; config.yaml is the one
        # the latest checkpoint was written with (so a refused launch leaves it alone)
        self.config_text, self.launch_record, self._recorded = to_yaml(cfg), None, False
        if b.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.launch_record = record_launch(self.run_dir, self.config_text)
            if newest_complete(self.run_dir / "checkpoints") is None:
                write_config_record(self.run_dir, self.launch_record, self.config_text, None)
        self._build()
        state = self.state = self._resume()
        self.log = MetricsLogger(
            self.run_dir,
            enabled=b.is_main,
            resume_step=state.step,
            total_steps=t.max_steps,
            progress_bar=t.progress_bar,
            progress_every_s=t.progress_every_s,
            max_time=t.max_time,
            trained_s=state.train_time_s,
        )
        if self.resumed_from is not None:
            how = self.resume_note if self.resume_mode == "elastic" else "exact"
            self.log.text(f"resumed from {self.resumed_from} (step {state.step}, {how})")
            if self.resume_changes:
                self.log.text(
                    "model.* changed on resume, every parameter's name and shape the same: "
                    + "; ".join(self.resume_changes)
                )
            self.checkpointer.restore_rng(self.resumed_from)  # last: nothing may draw after
        last_saved = state.step if self.resumed_from is not None else -1
        self._last_val: tuple[int, dict] = (-1, {})
        # finished before (at max_steps, or with trainer.max_time spent): report again, log nothing new
        finished = state.step >= t.max_steps or 0 < t.max_time <= state.train_time_s
        if finished:
            self.log.enabled = False

        # MFU's denominator (every rank at once: a CPU probe then shares the cores as training does)
        peak, peak_source = peak_tflops(b.device, t.mixed_precision, t.peak_tflops)
        if not finished:
            self.log.text(
                f"MFU against {peak} TFLOP/s per rank ({peak_source})"
                if peak
                else f"perf/mfu is not logged: {peak_source}"
            )
        self.schedule = Schedule.of(t, has_val=self.val_shards is not None)
        self.meter = ThroughputMeter(
            self.workload,
            samples_per_step=cfg.data.batch_size * t.grad_accum_steps * b.world_size,
            world_size=b.world_size,
            peak=peak,
            count_flops=b.is_main,
            say=self.log.text,
        )
        self.guard = NonFiniteGuard(
            b,
            policy=t.nonfinite,
            max_skips=t.nonfinite_max_skips,
            kept_checkpoint=self._kept_checkpoint,
            say=self.log.text,
        )
        self.train_step = TrainStep(
            backend=b,
            workload=self.workload,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            loader=self.loader,
            meter=self.meter,
            grad_accum_steps=t.grad_accum_steps,
            batch_size=cfg.data.batch_size,
            clip_grad_norm=t.clip_grad_norm,
            skip_nonfinite=t.nonfinite == "skip",
            fp16=t.mixed_precision == "fp16",
        )
        session_start = time.perf_counter()
        self.model.train()
        trained_before = state.train_time_s
        self.stopper = StopAgreement(
            check_every=t.stop_check_every,
            end_margin_s=t.end_margin_s,
            max_time=t.max_time,
            elapsed=lambda: trained_before + time.perf_counter() - session_start,
        )
        try:
            stopped, last_saved = (0, last_saved) if finished else self._loop(state, session_start, last_saved)
        finally:
            self.stopper.close()  # a signal from here on acts as it normally would
        if stopped:
            self.log.close()
            return {"step": state.step, "stopped": stopped}
        return self._finish(state, session_start, last_saved)

    def _loop(self, state: TrainState, session_start: float, last_saved: int) -> tuple[int, int]:
        """Steps until max_steps, max_time or an agreed stop: (stop reason or 0, last saved step)."""
        t, b, when = self.cfg.trainer, self.backend, self.schedule
        net = b.unwrap(self.model)  # for the workload's per-step hook
        self.meter.start_window()
        profiler = StepProfiler(
            t.profile_steps,
            start_step=state.step,
            max_steps=t.max_steps,
            device=b.device,
            out_dir=self.run_dir / "profile",
            rank=b.rank,
            say=self.log.text,
        )
        with profiler:
            while state.step < t.max_steps:
                step = state.step + 1
                lr = self.optimizer.param_groups[0]["lr"]
                loss, norm = self.train_step(step, measure_norm=when.should_measure_norm(step), label=profiler.label)
                state.step = step
                failpoint("step.end", step=step, rank=b.rank)
                self.workload.on_step_end(net, step)
                self.meter.steps += 1
                self.guard.observe(state, step, loss, norm)
                logged = when.should_log(step)
                if logged:
                    self._log_window(state, step, lr)
                self.log.advance(step)

                with self.meter.paused():  # throughput counts steps only
                    evals, samples, saves = when.should_eval(step), when.should_sample(step), when.should_save(step)
                    reason = self.stopper.poll(step)  # a signal, the job's end, max_time: all ranks, same step
                    if not logged and (evals or samples or saves or reason):
                        self.guard.check(step)  # nothing unchecked is evaluated, shown or saved
                    if evals:
                        self._eval_and_keep_best(state)
                    if samples:
                        self._log_samples(step)
                    if saves or reason:
                        if last_saved != step:
                            self._save(state, session_start)
                        last_saved = step
                    if reason == MAX_TIME:  # finish as at max_steps: final eval and report
                        self.log.text(f"trainer.max_time={t.max_time}s reached at step {step}")
                        return 0, last_saved
                    if reason:
                        self._wait_for_save()
                        self.log.text(
                            f"stopped after step {step} ({REASONS[reason]}); checkpoint "
                            f"{self.checkpointer.root / f'step-{step}'} is complete"
                        )
                        return reason, step
                profiler.step(step)  # a step's trace holds its hangers-on too
        return 0, last_saved

    def _log_window(self, state: TrainState, step: int, lr: float) -> None:
        """The log step: the window's means over ranks, rates and skips; halts on a non-finite
        window first. Collective."""
        b = self.backend
        now = time.perf_counter()
        window = self.guard.window
        skips = self.loader.stats()
        local = torch.cat(
            [
                window.sums(),
                torch.tensor([float(skips.get(k, 0)) for k in SKIP_KINDS], dtype=torch.float64, device=b.device),
            ]
        )
        totals = b.reduce_sum(local).tolist()
        self.guard.check(step, totals[:2])
        rates = self.meter.measure(now)
        slowest = b.reduce_max(torch.tensor(rates["train/data_wait_frac"], dtype=torch.float64, device=b.device))
        record = {
            "train/loss": totals[0] / (b.world_size * max(len(window.losses), 1)),
            "train/lr": lr,
            "train/grad_norm": totals[1] / (b.world_size * max(len(window.norms), 1)),
            **rates,
            "train/data_wait_frac_max": slowest.item(),  # a slow rank stalls every rank's all-reduce
            "train/samples_seen": self.loader.samples_seen,
        }
        record.update({f"data/skipped_{k}": v for k, v in zip(SKIP_KINDS, totals[2:]) if v})
        if not window.losses:  # every step of the window skipped: no loss to show
            del record["train/loss"], record["train/grad_norm"]
        if state.skipped_nonfinite:
            record["train/skipped_nonfinite"] = state.skipped_nonfinite
        if self.loader.epoch is not None:
            record["train/epoch"] = self.loader.epoch
        self.log.log(step, record, bar_keys=("train/loss", "train/lr", "train/samples_per_s"))
        window.clear()
        self.meter.start_window(now)

    def _kept_checkpoint(self) -> str:
        try:
            self._wait_for_save()  # a save in flight is of weights checked before it began
        except Exception:  # noqa: BLE001 - the error being reported is the caller's
            pass
        kept = newest_complete(self.checkpointer.root) if self.backend.is_main else None
        return (
            f"the last checkpoint, {kept}, is kept" if kept else "no checkpoint was written"
        ) + " and nothing after it is saved"

    # ---------------------------------------------------------------- hangers-on
    def _save(self, state: TrainState, session_start: float) -> None:
        saved = TrainState(**asdict(state))
        saved.train_time_s += time.perf_counter() - session_start
        records = {
            **self.workload.records(),
            CONFIG_RECORD: self.config_text,
            MODEL_RECORD: json.dumps({"shapes": self.model_shapes}),
        }
        self.checkpointer.save(
            state.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=asdict(saved),
            data_state=self.loader.state_dict(),
            records=records,
        )
        self._log_saves()

    def _wait_for_save(self) -> None:
        """The background save in flight, if any, completes (raising its error)."""
        self.checkpointer.wait()
        self._log_saves()

    def _log_saves(self) -> None:
        """How long each completed save blocked the loop, and how long it took in all."""
        for done in self.checkpointer.take_finished():
            self.log.log(done["step"], {"checkpoint/blocked_s": done["blocked_s"], "checkpoint/save_s": done["save_s"]})
            if self.launch_record is not None and not self._recorded:
                write_config_record(self.run_dir, self.launch_record, self.config_text, done["step"])
                self._recorded = True

    def evaluate(self, shards) -> dict[str, float]:
        b = self.backend
        net = b.unwrap(self.model)
        net.eval()
        sums: dict[str, torch.Tensor] = {}
        batches = eval_batches(
            shards,
            decode=self.workload.decode,
            collate=self.workload.collate,
            batch_size=self.cfg.data.eval_batch_size,
            rank=b.rank,
            world_size=b.world_size,
            on_error=self.cfg.data.on_error,
        )
        if b.shards_params:
            # a forward pass is collective here: every rank runs as many as the busiest,
            # repeating its last batch and not counting the repeats
            batches = list(batches)
            most = int(b.reduce_max(torch.tensor(len(batches), device=b.device)).item())
            counted = len(batches)
            batches += batches[-1:] * (most - counted)
        else:
            counted = None
        with torch.no_grad():
            for i, batch in enumerate(batches):
                out = self.workload.eval_sums(net, send_to_device(batch, b.device))
                if counted is None or i < counted:
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0) + v.double()
        net.train()
        if not sums:
            raise RuntimeError(
                f"rank {b.rank}: no eval samples in {shards.urls[:3]}...; an eval "
                f"split needs at least {b.world_size} samples"
            )
        # one collective for every statistic; scalars come back as floats, tensors (e.g.
        # score histograms) as CPU tensors of their shape
        keys = sorted(sums)
        totals = b.reduce_sum(torch.cat([sums[k].reshape(-1) for k in keys])).cpu()
        out, at = {}, 0
        for k in keys:
            n = sums[k].numel()
            out[k] = totals[at].item() if sums[k].dim() == 0 else totals[at : at + n].view(sums[k].shape)
            at += n
        return self.workload.eval_metrics(out)

    def _eval_and_keep_best(self, state: TrainState) -> dict[str, float]:
        step = state.step
        if self._last_val[0] == step:
            return self._last_val[1]
        metrics = self.evaluate(self.val_shards)
        self._last_val = (step, metrics)
        self.log.log(step, {f"val/{k}": v for k, v in metrics.items()})
        value = metrics[self.workload.best_metric]
        higher = self.workload.best_mode == "max"
        if state.best_step < 0 or (value > state.best_value if higher else value < state.best_value):
            state.best_value, state.best_step = value, step
            self._export(self.run_dir / "best", {"step": step, f"val/{self.workload.best_metric}": value})
        return metrics

    def _export(self, out: Path, meta: dict) -> None:
        """Whole-model weights as safetensors shards, gathered and written a tensor at a time
        (collective: sharded backends gather each tensor). A write failure on rank 0 (a full
        disk) lets the gather run to its end, so no rank waits in it, and then fails every rank."""
        b = self.backend
        tmp = out.with_name(out.name + ".tmp")
        error, shards = None, None
        try:
            if b.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                shards = SafetensorsShards(tmp, self.cfg.trainer.export_max_shard_size)
        except OSError as exc:
            error = exc
        for name, tensor in b.full_tensors(self.model):
            if shards is not None and error is None:
                try:
                    shards.add(name, tensor)
                except OSError as exc:
                    error = exc
        if b.is_main and error is None:
            try:
                shards.close()
                write_json(tmp / "meta.json", meta)
                (tmp / "config.yaml").write_text(to_yaml(self.cfg))
                for name, text in self.workload.records().items():
                    (tmp / name).write_text(text, encoding="utf-8")
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
            except OSError as exc:
                error = exc
        if b.reduce_sum(torch.tensor(float(error is not None), device=b.device)).item() > 0:
            if b.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            why = f"{type(error).__name__}: {error}" if error is not None else "rank 0 failed"
            raise CheckpointError(
                f"the best-weights export {out} could not be written (rank {b.rank}: {why}); "
                "the checkpoints are not affected"
            )

    def _log_samples(self, step: int) -> None:
        if self.cfg.trainer.num_samples <= 0:  # no samples asked for
            return
        if not (self.backend.is_main or self.backend.shards_params):  # sharded: all ranks sample
            return
        net = self.backend.unwrap(self.model)
        net.eval()
        n, seed = self.cfg.trainer.num_samples, self.cfg.trainer.seed
        images = self.workload.sample_images(net, n, torch.Generator().manual_seed(seed))
        texts = self.workload.sample_text(net, n, torch.Generator().manual_seed(seed))
        net.train()
        if images is not None and self.backend.is_main:
            self.log.image("samples", images, step)
            prompts = self.workload.sample_captions(n)
            if prompts:
                self.log.tb_text("samples/prompts", "\n\n".join(prompts), step)
        if texts is not None and self.backend.is_main:
            self.log.samples_text("samples/text", texts, step)
            # the latest samples as plain text too, for launch.report and a quick look
            (self.run_dir / "samples.txt").write_text(f"step {step}\n\n" + "\n\n".join(texts) + "\n")

    def _finish(self, state: TrainState, session_start: float, last_saved: int) -> dict:
        b, step = self.backend, state.step
        if last_saved != step:
            self._save(state, session_start)
        self._wait_for_save()
        final: dict = {"step": step}
        if self.val_shards is not None:
            final.update({f"val/{k}": v for k, v in self._eval_and_keep_best(state).items()})
        if not self.schedule.should_sample(step):  # the loop sampled this step already
            self._log_samples(step)
        best = self.run_dir / "best"
        b.barrier()  # rank 0's best export is on disk
        if self.val_shards is not None and (best / "meta.json").exists():
            b.load_exported(self.model, best, group=self.checkpointer.group)
            final["best_step"] = state.best_step
        held_out = self._last_val[1]
        if self.test_shards is not None:
            held_out = self.evaluate(self.test_shards)
            final.update({f"test/{k}": v for k, v in held_out.items()})
        for k in self.workload.headline_metrics:
            if k not in held_out:
                raise KeyError(
                    f"headline metric '{k}' needs a data.test or data.val split whose "
                    f"eval reports it; got {sorted(held_out)}"
                )
            final[k] = held_out[k]
        extra: dict = {}
        if b.is_main or b.shards_params:  # sharded: a forward pass needs every rank
            net = b.unwrap(self.model)
            net.eval()
            extra = self.workload.final_metrics(net, torch.Generator().manual_seed(self.cfg.trainer.seed))
            net.train()
        weights = None
        if self.workload.export is not None:  # the workload's own consolidated format; collective
            weights = dict(b.full_tensors(self.model))
        if b.is_main:
            final.update(extra)
            if weights is not None:
                self.workload.export(weights, self.run_dir, final)
            write_json(self.run_dir / "final_metrics.json", final)
            self.log.log(step, {k: v for k, v in final.items() if k.startswith("test/") or k in extra})
            print(summarize_line(f"[{self.cfg.run.name or self.run_dir.name}] final", final), flush=True)
        self.log.close()
        return final
