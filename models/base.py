"""The Workload interface: everything the trainer needs to know about a model family.

A workload owns its model, how raw shard samples become tensors, its loss, its eval
metrics and its samples. The trainer owns steps, devices, checkpoints and logs. Adding a
workload touches `models/` and `configs/` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import default_collate


class Workload:
    Config: ClassVar[type]  # keyword-only dataclass with a `name` field
    best_metric: ClassVar[str] = "loss"  # eval metric that picks the `best` export
    best_mode: ClassVar[str] = "min"  # "max" for metrics where higher is better (mAP)
    # metrics of the held-out split (test, else val) that final_metrics.json also carries
    # under their plain names, e.g. ("map50", "map50_95")
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    # what train throughput is counted in besides samples ("tokens", "images"; "samples":
    # nothing more), with units_per_sample() of them in each sample
    throughput_unit: ClassVar[str] = "samples"
    # the run's splits, handed over by the trainer (bind_splits); none until then
    splits: Mapping[str, Callable[..., Iterator]] = MappingProxyType({})
    # the run's trainer section (bind_trainer); None outside a training run
    trainer_cfg: Any = None

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def bind_trainer(self, trainer_cfg: Any) -> None:
        """The run's `trainer` section, handed over before `build_model` on every rank (e.g. to
        build frozen parts in `trainer.mixed_precision`'s dtype). Other callers (export, doctor,
        generate) build the model without it: in fp32, as a checkpoint is read back."""
        self.trainer_cfg = trainer_cfg

    def bind_splits(self, splits: Mapping[str, Callable[..., Iterator]]) -> None:
        """The run's splits before training starts, on every rank: `splits[name]()` iterates
        that split's raw samples in shard order, `splits[name](decode=f)` them through `f`
        (a sample that does not decode is left out under data.on_error=skip), for each of
        "train" (data.train; a data.mix is not included), "val" and "test" the recipe has.
        What a workload takes from its data (default sample prompts, a reference set) it reads
        here, so that it knows no dataset of its own; one that needs a split checks for it here."""
        self.splits = splits

    def first_split(self, *names: str) -> str | None:
        """The first of `names` the run has (e.g. "test", "val": the held-out split), or None."""
        return next((s for s in names if s in self.splits), None)

    def check_data(self, manifests: Mapping[str, tuple[str, dict]]) -> None:
        """Refuse data this workload's config cannot read, before any process group starts:
        `manifests` maps the config key of each split's urls ("data.train.urls", "data.mix.0.urls",
        "data.val.urls", "data.test.urls") to (its manifest's path, the manifest), for the splits
        that have one. Raise ValueError naming the keys and values that disagree."""

    def records(self) -> dict[str, str]:
        """Text files (name -> content) that travel with the run: rank 0 adds them to every
        checkpoint and to best/ (e.g. the tokenizer the model was trained with)."""
        return {}

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def decode(self, sample: dict) -> Any:
        """Raw shard sample (bytes per extension, plus __key__/__url__) -> tensors.

        Runs inside data-loader workers; keep it free of CUDA and of global state.
        """
        raise NotImplementedError

    def collate(self, samples: list) -> Any:
        return default_collate(samples)

    def decode_batch(self, samples: list[dict]) -> Any:
        """Raw samples -> one training batch, equal to `collate([decode(s) for s in samples])`.

        Override where a whole batch decodes faster at once (small samples: the per-sample
        Python cost is the loader's). May raise on a bad sample: the stream then decodes that
        batch's samples one by one, so `data.on_error` names each bad one.
        """
        return self.collate([self.decode(s) for s in samples])

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar loss of one micro-batch; `model` is the backend-wrapped module."""
        raise NotImplementedError

    def units_per_sample(self) -> int:
        """Tokens (or images) in one training sample, for `perf/<unit>_per_s`."""
        return 1

    def flops_model(self) -> nn.Module:
        """The model whose FLOPs are counted for MFU, on the meta device (models/flops.py):
        `build_model()` built there. A workload that reads weights from disk (from_pretrained
        refuses the meta device) overrides it to build the same architecture from its config."""
        with torch.device("meta"):
            return self.build_model()

    def flops_per_sample(self, batch: Any, batch_size: int) -> float:
        """Model FLOPs of one training step per sample, for MFU (models/flops.py says how)."""
        from models.flops import train_flops_per_sample

        return train_flops_per_sample(self, batch, batch_size)

    def flops_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss whose forward and backward FLOPs are counted for MFU, run on a meta-device
        model and batch (models/flops.py); override when the training loss needs host values."""
        return self.training_loss(model, batch)

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Additive statistics of one eval batch (summed over batches and ranks)."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics from the summed statistics; must contain `best_metric`."""
        raise NotImplementedError

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """n samples as images in [0, 1], shape (n, C, H, W), or None."""
        return None

    def sample_captions(self, n: int) -> list[str] | None:
        """What `sample_images(n)` was asked for (its prompts, in grid order), logged beside it."""
        return None

    @torch.no_grad()
    def final_metrics(self, model: nn.Module, generator: torch.Generator) -> dict[str, float]:
        """Metrics computed once at the end of a run from the model itself (e.g. sample
        quality); they go to final_metrics.json and the final summary line."""
        return {}

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """After each optimizer step, on the unwrapped model of every rank (e.g. an EMA update)."""

    # A workload that writes artifacts of its own (e.g. a diffusers folder) overrides this.
    # It runs on the main rank at the end of a run with the full, gathered weights.
    export = None

    @torch.no_grad()
    def sample_text(self, model: nn.Module, n: int, generator: torch.Generator) -> list[str] | None:
        """Up to n generated texts, or None."""
        return None
