"""Online action detection on frame-feature windows (e.g. `launch.make_shards action-streams`):
OadTR (`oadtr`) and a GRU baseline (`oad_gru`) read the same windows, are scored the same
way and differ only in the model and OadTR's anticipation loss.

A sample is a window of the last `model.window` frames' features, (window, feature_dim)
floats ending at the current frame (`npy`), and a `json` record {"label": k, "future":
[...]}: the current frame's class (0 is background, 1..action_classes the actions) and the
classes of the next `model.anticipation` frames (-1: past the stream's end, no target).
These sizes are the data's, so the recipe states them; only l_d has a default (the paper's).

The metric is the per-frame mAP of the online-detection papers (`frame_map`): for each
action class, the AP of every frame of the split ranked by that class's softmax score,
averaged over the action classes (background excluded). A ranking over the split is not a
sum, so eval batches contribute score histograms per class (models/average_precision.py),
which are.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.decode import fields
from models.average_precision import average_precision_from_histograms, mean_ignoring_nan, score_histograms
from models.base import Workload
from models.oadtr.model import OadTR, WindowGRU
from models.registry import register

NO_TARGET = -1  # a future frame past the stream's end


@dataclass(kw_only=True)
class StreamConfig:
    name: str
    # the data's shape, as the recipe states it
    feature_dim: int  # floats per frame
    window: int  # T: frames in each sample, the current one last
    action_classes: int  # K; class 0 is background, 1..K the actions
    anticipation: int = 8  # l_d: future frames' classes in each sample (the paper's 8)
    dropout: float = 0.1
    histogram_bins: int = 1000  # score bins per class for the AP (1000: ~1e-3 of the exact AP)


@dataclass(kw_only=True)
class OadTRConfig(StreamConfig):
    name: str = "oadtr"
    dim: int = 64
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 1
    ff_mult: int = 2
    future_loss_weight: float = 0.5  # lambda of the paper (its default)


@dataclass(kw_only=True)
class GRUConfig(StreamConfig):
    name: str = "oad_gru"
    hidden: int = 192  # about OadTR's parameter count at its defaults
    layers: int = 1


def future_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over the future frames that have a target, their count)."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=NO_TARGET, reduction="sum")
    return ce, (targets != NO_TARGET).sum()


class FrameDetection(Workload):
    """Decoding, loss and per-frame mAP shared by both detectors."""

    best_metric = "frame_map"
    best_mode = "max"
    headline_metrics = ("frame_map",)

    def decode(self, sample: dict) -> dict[str, torch.Tensor]:
        c = self.cfg
        for field in ("npy", "json"):
            if field not in sample:
                raise KeyError(f"no '{field}' field; the sample has {fields(sample)}")
        frames = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        if frames.shape != (c.window, c.feature_dim):
            raise ValueError(
                f"window has shape {frames.shape}, model.window x model.feature_dim is ({c.window}, {c.feature_dim})"
            )
        record = json.loads(sample["json"])
        for key in ("label", "future"):
            if key not in record:
                raise KeyError(f"json record has no '{key}' (it has {sorted(record)})")
        label, future = record["label"], record["future"]
        if not 0 <= label <= c.action_classes:
            raise ValueError(f"label {label} is outside 0..{c.action_classes} (model.action_classes)")
        if len(future) != c.anticipation:
            raise ValueError(f"{len(future)} future labels, model.anticipation is {c.anticipation}")
        if any(not NO_TARGET <= f <= c.action_classes for f in future):
            raise ValueError(f"future labels {future} are outside {NO_TARGET}..{c.action_classes}")
        return {
            "frames": torch.from_numpy(frames.astype(np.float32)),
            "label": torch.tensor(label),
            "future": torch.tensor(future),
        }

    def _loss_terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Current-frame logits and the losses as sums over the batch (with their counts)."""
        current, future = model(batch["frames"])
        terms = {
            "loss_sum": F.cross_entropy(current, batch["label"], reduction="sum"),
            "count": torch.tensor(float(len(current)), device=current.device),
        }
        if future is not None:
            terms["future_loss_sum"], terms["future_count"] = future_cross_entropy(future, batch["future"])
        return current, terms

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        _, t = self._loss_terms(model, batch)
        loss = t["loss_sum"] / t["count"]
        if "future_loss_sum" in t:  # OadTR: L = CE(current) + lambda * CE(future)
            loss = loss + self.cfg.future_loss_weight * t["future_loss_sum"] / t["future_count"].clamp(min=1)
        return loss

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        current, sums = self._loss_terms(model, batch)
        label, probs = batch["label"], current.float().softmax(-1)
        sums["correct"] = (current.argmax(-1) == label).sum()
        hist = torch.stack(
            [
                score_histograms(probs[:, c], label == c, self.cfg.histogram_bins)
                for c in range(1, self.cfg.action_classes + 1)
            ]
        )
        sums["hist"] = hist  # (K, 2, bins) true/false-positive counts by score bin, classes 1..K
        return sums

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        hist = torch.as_tensor(sums["hist"])
        # every frame is scored for every class: a class's true positives are its frames
        aps = [average_precision_from_histograms(h, float(h[0].sum())) for h in hist]
        out = {
            "frame_map": mean_ignoring_nan(aps),
            "accuracy": sums["correct"] / sums["count"],
            "loss": sums["loss_sum"] / sums["count"],
            "frames": sums["count"],
        }
        if "future_loss_sum" in sums:
            n = sums["future_count"]
            out["future_loss"] = sums["future_loss_sum"] / n if n else math.nan
        return out


@register("oadtr")
class OadTRWorkload(FrameDetection):
    Config = OadTRConfig

    def build_model(self) -> nn.Module:
        c = self.cfg
        return OadTR(
            feature_dim=c.feature_dim,
            window=c.window,
            num_classes=c.action_classes + 1,
            anticipation=c.anticipation,
            dim=c.dim,
            heads=c.heads,
            encoder_layers=c.encoder_layers,
            decoder_layers=c.decoder_layers,
            ff_mult=c.ff_mult,
            dropout=c.dropout,
        )


@register("oad_gru")
class GRUWorkload(FrameDetection):
    Config = GRUConfig

    def build_model(self) -> nn.Module:
        c = self.cfg
        return WindowGRU(
            feature_dim=c.feature_dim,
            num_classes=c.action_classes + 1,
            hidden=c.hidden,
            layers=c.layers,
            dropout=c.dropout,
        )
