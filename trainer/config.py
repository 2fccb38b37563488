"""The run's config tree: small typed dataclasses, YAML recipes, dotted overrides.

A recipe is a YAML file whose keys mirror `RunConfig`; `a.b=c` overrides are applied on
top. The `model:` section is typed by the workload that `model.name` selects, so a typo
in a model key fails just like a typo in a trainer key. Everything here runs before any
process group exists: a bad config never costs a rank.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem, always naming the offending key."""


@dataclass(kw_only=True)
class RunSection:
    dir: str = MISSING
    name: str = ""


@dataclass(kw_only=True)
class SplitConfig:
    """One data split: WebDataset shard URLs (brace lists allowed)."""

    urls: str = ""
    manifest: str = ""  # default: manifest.json beside the first local shard, if present
    weight: float = 1.0  # share of a mixture (data.mix)


@dataclass(kw_only=True)
class BucketsConfig:
    """Aspect-ratio buckets (docs/data.md, "Aspect-ratio buckets"): give `area` (or `side`,
    meaning side x side) to generate them, or `sizes` to list them; none = off."""

    area: int = 0  # pixels per bucket, e.g. 262144 (512 x 512)
    side: int = 0  # the same as area = side * side
    step: int = 64  # bucket sides are multiples of this
    min_side: int = 0  # 0 = step
    max_side: int = 0  # 0 = bounded by max_ratio only
    max_ratio: float = 2.0  # the longer side over the shorter, at most
    sizes: list[list[int]] = field(default_factory=list)  # explicit [[width, height], ...]

    @property
    def enabled(self) -> bool:
        return bool(self.area or self.side or self.sizes)


@dataclass(kw_only=True)
class TransformsConfig:
    """How an image becomes its bucket (or model.image_size square); random choices are
    seeded by (data.seed, epoch, sample key)."""

    resize: str = "cover"  # cover (scale to cover, then crop) | stretch (to the size exactly)
    crop: str = "center"  # center | random
    hflip: float = 0.0  # probability of a horizontal flip


@dataclass(kw_only=True)
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    test: SplitConfig = field(default_factory=SplitConfig)
    batch_size: int = 64  # per rank, per micro step
    # samples per optimizer step over all ranks; 0 = batch_size x grad_accum_steps x ranks.
    # When set, grad_accum_steps follows from the world size, so one recipe keeps its
    # global batch from a laptop to many nodes (resolve_global_batch)
    global_batch_size: int = 0
    eval_batch_size: int = 256
    num_workers: int = 1
    shuffle_buffer: int = 256
    seed: int = 0  # shard and sample order; independent of trainer.seed
    prefetch_factor: int = 4
    mix: list[SplitConfig] = field(default_factory=list)  # more training sources, by weight
    resampled: bool = False  # draw shards with replacement (no epochs, no exactly-once)
    on_error: str = "skip"  # skip (count, warn, go on) | fail
    key_ledger: bool = False  # append consumed sample names to run.dir/ledger/ (audits)
    buckets: BucketsConfig = field(default_factory=BucketsConfig)  # one image shape per batch
    transforms: TransformsConfig = field(default_factory=TransformsConfig)


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    # torch AdamW's implementation: auto (the fused kernel where torch has one for the parameters'
    # device and dtype, CUDA and CPU included; else torch's pick) | for-loop | foreach | fused
    impl: str = "auto"


@dataclass(kw_only=True)
class AccelerateSection:
    strategy: str = "ddp"  # ddp | fsdp (FSDP2, fully_shard)
    # FSDP2 units: each block (a ModuleList/Sequential member, or a `_no_split_modules`
    # class) with at least this many parameters is sharded on its own; the rest with the root
    fsdp_min_params: int = 100_000


@dataclass(kw_only=True)
class DeepSpeedSection:
    zero_stage: int = 2  # 0-3
    offload_optimizer: bool = False  # optimizer state to CPU (stage >= 1)
    offload_params: bool = False  # parameters to CPU (stage 3)
    config_file: str = ""  # a DeepSpeed JSON for anything else; its keys win
    via: str = "auto"  # who builds the engine: native | accelerate (its DeepSpeed plugin) | auto
    # also gather the whole weights into every checkpoint (safetensors beside the engine's
    # partitions: rank 0 writes the model once more); `launch.export` consolidates on demand
    save_full_weights: bool = False


@dataclass(kw_only=True)
class TrainerConfig:
    backend: str = "accelerate"  # accelerate | deepspeed
    accelerate: AccelerateSection = field(default_factory=AccelerateSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    max_steps: int = 1000
    max_time: float = 0.0  # seconds of training wall time; 0 = no limit
    seed: int = 0
    grad_accum_steps: int = 1
    clip_grad_norm: float = 0.0  # 0 = no clipping (the norm is still logged)
    mixed_precision: str = "no"  # no | bf16 | fp16
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    sample_every: int = 0  # 0 = only at the end; images go to TensorBoard
    num_samples: int = 64  # images or texts per sample step; 0: none
    checkpoint_every: int = 0  # 0 = only at the end
    keep_last_k: int = 3
    # stage the checkpoint to host memory and write it in a background thread while training
    # goes on (Accelerate backend); the next save, a stop and the end of the run wait for it
    checkpoint_async: bool = False
    # consolidated weights (best/, launch.export, save_full_weights) are cut into shards of at
    # most this size: model-0000i-of-0000K.safetensors + model.safetensors.index.json
    export_max_shard_size: str = "5GB"
    resume: str = "auto"  # auto | never | PATH to a step-N checkpoint
    # rank 0's progress: a bar on a terminal; in a pipe or a SLURM log one plain line every
    # progress_every_s seconds instead (false: neither)
    progress_bar: bool = True
    progress_every_s: float = 30.0
    dist_timeout_s: int = 600  # a collective waiting this long for a lost rank fails the run
    # the same for a checkpoint's save or load, which waits for the slowest rank's files
    checkpoint_timeout_s: int = 1800
    # a NaN/Inf loss or grad norm: halt (stop with exit 6 before any checkpoint of the poisoned
    # weights; the last good one is kept) | skip (leave the weights alone, count it, go on;
    # one host sync per step; halts after nonfinite_max_skips skips in a row)
    nonfinite: str = "halt"
    nonfinite_max_skips: int = 20
    # preemption (trainer/preempt.py): ranks vote on a stop every this many steps;
    # 0 = about once a second, from rank 0's step rate
    stop_check_every: int = 0
    # with a known job end time (TRIBUTARY_JOB_END, set by slurm/*.sbatch), stop and requeue
    # this many seconds before it: room for the last steps and a checkpoint
    end_margin_s: float = 300.0
    requeue: bool = True  # after a SIGUSR1 or time-limit stop under SLURM, `scontrol requeue`
    # one launch writes a run dir (run.dir/lock.json, trainer/rundir.py): a holder whose
    # heartbeat is this old is taken over (a dead process on this host, or the same SLURM
    # job after a requeue, at once)
    lock_stale_s: float = 120.0
    # MFU's denominator, TFLOP/s of one rank's device; 0 = the data sheet of a known GPU
    # (A100, H100, H200) at the run's precision, or a matmul probe on a CPU (trainer/meter.py)
    peak_tflops: float = 0.0
    # [first, last]: a torch.profiler trace of these steps, per rank, in run.dir/profile
    # (TensorBoard with torch-tb-profiler, or ui.perfetto.dev); [] = off
    profile_steps: list[int] = field(default_factory=list)
    compile: bool = False  # torch.compile the model before wrapping (compiles at the first steps)


@dataclass(kw_only=True)
class ModelSection:
    """Placeholder; replaced by the selected workload's own Config dataclass."""

    name: str = MISSING


@dataclass(kw_only=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=ModelSection)


BACKENDS = ("accelerate", "deepspeed")
PRECISIONS = ("no", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")


def _omegaconf_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"config key '{key}': {first_line}")


def _load_recipe(path: Path, seen: tuple = ()):
    """A recipe may start from another: `base: other.yaml` (relative to itself)."""
    if path.resolve() in seen:
        raise ConfigError(f"recipe '{path}': 'base' chain loops back to itself")
    raw = OmegaConf.load(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.exists():
        raise ConfigError(f"config key 'base': recipe '{base_path}' (from '{path}') does not exist")
    return OmegaConf.merge(_load_recipe(base_path, seen + (path.resolve(),)), raw)


# one name for one switch: the other names users reach for are refused with the right one
RENAMED_KEYS = {
    "model.compile": "trainer.compile",
    "model.gradient_checkpointing": "model.activation_checkpointing",
    "trainer.activation_checkpointing": "model.activation_checkpointing",
    "trainer.gradient_checkpointing": "model.activation_checkpointing",
}


def load_config(
    recipe: str | os.PathLike | None, overrides: list[str] = (), *, model_schema: Callable[[str], type]
) -> RunConfig:
    """Read a YAML recipe, apply `a.b=c` overrides, type-check and validate.

    `model_schema(name)` is the Config dataclass of workload `name` (the launcher hands over
    the model registry: the trainer knows no workload). Returns plain dataclass objects.
    Raises ConfigError naming the key at fault. An empty override (`data.val.urls=`) is the
    empty string, as `data.val.urls=""` is.
    """
    try:
        raw = _load_recipe(Path(recipe)) if recipe else OmegaConf.create({})
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
        for item in overrides:
            key, value = item.split("=", 1)
            try:
                raw = OmegaConf.merge(raw, OmegaConf.from_dotlist([item if value else f"{key}=''"]))
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"config key '{item.split('=', 1)[0]}': cannot parse the value "
                    f"of '{item}' ({str(exc).splitlines()[0]})"
                ) from None
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe '{recipe}' is not valid YAML: {exc}") from None
    except FileNotFoundError:
        raise ConfigError(f"recipe file '{recipe}' does not exist") from None

    for key, name in RENAMED_KEYS.items():
        value = OmegaConf.select(raw, key, default=RENAMED_KEYS)
        if value is RENAMED_KEYS:
            continue
        if value in (False, None):  # off, as the config.yaml of a run made before the rename lists it
            section, leaf = key.rsplit(".", 1)
            OmegaConf.select(raw, section).pop(leaf)
            continue
        raise ConfigError(f"config key '{key}' is not a key: it is called '{name}'")

    name = OmegaConf.select(raw, "model.name")
    if not name:
        raise ConfigError("config key 'model.name' is missing: say which workload to train")
    try:
        model_cls = model_schema(name)
    except ValueError as exc:
        raise ConfigError(f"config key 'model.name': {exc}") from None

    # Lists of structured entries lose their path in OmegaConf's errors: check each
    # data.mix entry on its own so that a typo is reported as data.mix.<i>.<key>.
    mix = OmegaConf.select(raw, "data.mix")
    if mix is not None:
        if not OmegaConf.is_list(mix):
            raise ConfigError("config key 'data.mix': must be a list of {urls, weight} entries")
        for i, entry in enumerate(mix):
            try:
                OmegaConf.merge(OmegaConf.structured(SplitConfig), entry)
            except OmegaConfBaseException as exc:
                err = _omegaconf_error(exc)
                raise ConfigError(str(err).replace("config key '", f"config key 'data.mix.{i}.", 1)) from None

    schema = OmegaConf.structured(RunConfig)
    schema.model = OmegaConf.structured(model_cls)
    try:
        merged = OmegaConf.merge(schema, raw)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"config key '{missing[0]}' is required but not set")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc) from None
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    t, o, d = cfg.trainer, cfg.optim, cfg.data
    _check(t.backend in BACKENDS, "trainer.backend", f"'{t.backend}' is not one of {BACKENDS}")
    _check(
        t.accelerate.strategy in ("ddp", "fsdp"),
        "trainer.accelerate.strategy",
        f"'{t.accelerate.strategy}' is not ddp or fsdp",
    )
    ds = t.deepspeed
    _check(0 <= ds.zero_stage <= 3, "trainer.deepspeed.zero_stage", "must be 0, 1, 2 or 3")
    _check(
        not ds.offload_params or ds.zero_stage == 3,
        "trainer.deepspeed.offload_params",
        "parameter offload needs trainer.deepspeed.zero_stage=3",
    )
    _check(
        not ds.offload_optimizer or ds.zero_stage >= 1,
        "trainer.deepspeed.offload_optimizer",
        "optimizer offload needs trainer.deepspeed.zero_stage >= 1",
    )
    _check(
        ds.via in ("auto", "native", "accelerate"),
        "trainer.deepspeed.via",
        f"'{ds.via}' is not auto, native or accelerate",
    )
    _check(
        not ds.config_file or Path(ds.config_file).is_file(),
        "trainer.deepspeed.config_file",
        f"'{ds.config_file}' does not exist",
    )
    _check(t.max_steps >= 1, "trainer.max_steps", "must be >= 1")
    _check(t.max_time >= 0, "trainer.max_time", "must be >= 0 (0 = no limit)")
    _check(t.grad_accum_steps >= 1, "trainer.grad_accum_steps", "must be >= 1")
    _check(t.clip_grad_norm >= 0, "trainer.clip_grad_norm", "must be >= 0 (0 = off)")
    _check(t.log_every >= 1, "trainer.log_every", "must be >= 1")
    for key in ("eval_every", "sample_every", "checkpoint_every"):
        _check(getattr(t, key) >= 0, f"trainer.{key}", "must be >= 0 (0 = only at the end)")
    _check(
        t.checkpoint_every % t.log_every == 0,
        "trainer.checkpoint_every",
        f"must be a multiple of trainer.log_every={t.log_every} (a checkpoint closes a log window)",
    )
    _check(t.nonfinite in ("halt", "skip"), "trainer.nonfinite", f"'{t.nonfinite}' is not halt or skip")
    _check(
        t.nonfinite != "skip" or t.backend == "accelerate",
        "trainer.nonfinite",
        "skip needs trainer.backend=accelerate (a DeepSpeed engine steps inside itself; "
        "its fp16 loss scaler skips overflowing steps on its own)",
    )
    _check(t.nonfinite_max_skips >= 1, "trainer.nonfinite_max_skips", "must be >= 1")
    _check(t.dist_timeout_s >= 1, "trainer.dist_timeout_s", "must be >= 1")
    _check(t.checkpoint_timeout_s >= 1, "trainer.checkpoint_timeout_s", "must be >= 1")
    _check(t.keep_last_k >= 1, "trainer.keep_last_k", "must be >= 1")
    _check(
        not t.checkpoint_async or t.backend == "accelerate",
        "trainer.checkpoint_async",
        "needs trainer.backend=accelerate (a DeepSpeed engine writes its checkpoint synchronously)",
    )
    from trainer.export import parse_size

    try:
        parse_size(t.export_max_shard_size)
    except ValueError:
        raise ConfigError(
            f"config key 'trainer.export_max_shard_size': cannot read "
            f"'{t.export_max_shard_size}' as a size (e.g. 5GB, 500MB, 2GiB)"
        ) from None
    _check(t.stop_check_every >= 0, "trainer.stop_check_every", "must be >= 0 (0 = about once a second)")
    _check(t.end_margin_s >= 0, "trainer.end_margin_s", "must be >= 0")
    _check(t.lock_stale_s > 0, "trainer.lock_stale_s", "must be > 0 seconds")
    _check(t.progress_every_s > 0, "trainer.progress_every_s", "must be > 0 seconds")
    if t.mixed_precision == "False":  # YAML 1.1 reads a bare `no` (as in `trainer.mixed_precision=no`) as false
        t.mixed_precision = "no"
    _check(
        t.mixed_precision in PRECISIONS, "trainer.mixed_precision", f"'{t.mixed_precision}' is not one of {PRECISIONS}"
    )
    if t.mixed_precision == "fp16":
        import torch

        _check(
            torch.cuda.is_available(),
            "trainer.mixed_precision",
            "fp16 needs a CUDA device (none is visible); use bf16 or no on CPU",
        )
    _check(bool(cfg.run.dir), "run.dir", "is empty: name the run's folder")
    if t.resume not in ("auto", "never"):
        _check(
            bool(t.resume) and Path(t.resume).is_dir(),
            "trainer.resume",
            f"'{t.resume}' is neither auto, never, nor an existing checkpoint folder",
        )
    _check(o.lr > 0, "optim.lr", "must be > 0")
    _check(o.schedule in SCHEDULES, "optim.schedule", f"'{o.schedule}' is not one of {SCHEDULES}")
    _check(0 <= o.warmup_steps <= t.max_steps, "optim.warmup_steps", f"must be in [0, trainer.max_steps={t.max_steps}]")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(
        o.impl in ("auto", "for-loop", "foreach", "fused"),
        "optim.impl",
        f"'{o.impl}' is not auto, for-loop, foreach or fused",
    )
    _check(t.peak_tflops >= 0, "trainer.peak_tflops", "must be >= 0 (0 = known GPU or CPU probe)")
    p = t.profile_steps
    _check(
        not p or (len(p) == 2 and 1 <= p[0] <= p[1]),
        "trainer.profile_steps",
        f"{list(p)} is not [] or [first, last] with 1 <= first <= last",
    )
    _check(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    _check(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    _check(bool(d.train.urls), "data.train.urls", "no training shards given")
    _check(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    _check(d.global_batch_size >= 0, "data.global_batch_size", "must be >= 0 (0 = batch_size x ranks)")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1 (1 = no sample shuffle)")
    _check(d.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
    _check(d.on_error in ("skip", "fail"), "data.on_error", f"'{d.on_error}' is not skip or fail")
    _check(d.train.weight > 0, "data.train.weight", "must be > 0")
    for i, m in enumerate(d.mix):
        _check(bool(m.urls), f"data.mix.{i}.urls", "no shards given")
        _check(m.weight > 0, f"data.mix.{i}.weight", "must be > 0")
    if t.eval_every > 0:
        _check(bool(d.val.urls), "data.val.urls", "trainer.eval_every > 0 needs validation shards")
    check_buckets(d.buckets)
    tr = d.transforms
    _check(tr.resize in ("cover", "stretch"), "data.transforms.resize", f"'{tr.resize}' is not cover or stretch")
    _check(tr.crop in ("center", "random"), "data.transforms.crop", f"'{tr.crop}' is not center or random")
    _check(0 <= tr.hflip <= 1, "data.transforms.hflip", f"{tr.hflip} is not a probability in [0, 1]")


def check_buckets(b: BucketsConfig) -> None:
    k = "data.buckets"
    _check(not (b.area and b.side), f"{k}.side", "give area or side, not both")
    _check(not (b.sizes and (b.area or b.side)), f"{k}.sizes", "give sizes, or area/side to generate them, not both")
    for name in ("area", "side", "min_side", "max_side"):
        _check(getattr(b, name) >= 0, f"{k}.{name}", "must be >= 0")
    _check(b.step >= 1, f"{k}.step", "must be >= 1")
    _check(b.max_ratio >= 1, f"{k}.max_ratio", "must be >= 1 (the longer side over the shorter)")
    for i, wh in enumerate(b.sizes):
        _check(len(wh) == 2 and min(wh) >= 1, f"{k}.sizes.{i}", f"{list(wh)} is not [width, height] with sides >= 1")
    if b.area or b.side:
        from data_pipelines.buckets import generate_buckets

        try:
            generate_buckets(**bucket_generation(b))
        except ValueError as exc:
            raise ConfigError(f"config key '{k}': {exc}") from None


def bucket_generation(b: BucketsConfig) -> dict:
    """Keyword arguments of data_pipelines.buckets.generate_buckets for this config."""
    area = b.area or b.side * b.side
    return dict(area=area, step=b.step, min_side=b.min_side, max_side=b.max_side, max_ratio=b.max_ratio)


def training_splits(d: DataConfig) -> list[tuple[str, SplitConfig]]:
    """(config key of its urls, split) of every training source: data.train, then data.mix.<i>."""
    return [("data.train.urls", d.train)] + [(f"data.mix.{i}.urls", m) for i, m in enumerate(d.mix)]


def resolve_global_batch(cfg: RunConfig, world_size: int) -> None:
    """With data.global_batch_size set, derive trainer.grad_accum_steps for `world_size` ranks."""
    d, t = cfg.data, cfg.trainer
    if not d.global_batch_size:
        return
    per_step = d.batch_size * world_size
    _check(
        d.global_batch_size % per_step == 0,
        "data.global_batch_size",
        f"{d.global_batch_size} is not a multiple of data.batch_size={d.batch_size} x "
        f"{world_size} rank(s) = {per_step}",
    )
    accum = d.global_batch_size // per_step
    _check(
        t.grad_accum_steps in (1, accum),
        "trainer.grad_accum_steps",
        f"{t.grad_accum_steps} contradicts data.global_batch_size={d.global_batch_size} "
        f"(which needs {accum} on {world_size} rank(s)); set one of them",
    )
    t.grad_accum_steps = accum


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
