"""Average precision, exactly from ranked scores and approximately from additive score
histograms that can be summed over eval batches and ranks.

Both use COCO's interpolation: precision is made monotone (at each recall, the best
precision at that recall or beyond) and read at the 101 recalls 0, 0.01, ..., 1.

The trainer sums eval statistics over batches and ranks, and a ranking over the whole
split is not a sum. Counting true and false positives in `bins` score bins is: AP from the
summed counts treats the detections inside one bin as tied, and with 1000 bins it agrees
with the exact value to about 1e-3 (tests/test_detr.py measures it). pycocotools and
torchmetrics' detection mAP gather every detection instead. torchmetrics' classification
AveragePrecision(thresholds=N) does keep binned counts, but it is not a dependency and its
AP is the uninterpolated sum over thresholds of (R_n - R_n-1) * P_n, not COCO's 101 points.

`frame_map` (models/oadtr/workload.py, OadTR and its GRU baseline) is the mean, over the
action classes that have frames, of `average_precision_from_histograms`: every frame is
one detection per class, scored by its softmax probability, in `model.histogram_bins`
(1000) bins of width 1/1000, with that class's frames as the positives. So it is binned
per-frame AP with COCO's 101-point interpolation; it is not the uninterpolated AP
(sklearn's average_precision_score) that online-detection papers usually report, nor
COCO's box AP (no IoU matching, no maxDets).
"""

from __future__ import annotations

import math

import torch

RECALLS = torch.linspace(0, 1, 101, dtype=torch.float64)


def _interpolated(precision: torch.Tensor, recall: torch.Tensor) -> float:
    """COCO 101-point AP from precision/recall at decreasing score thresholds."""
    if precision.numel() == 0:
        return 0.0
    envelope = precision.flip(0).cummax(0).values.flip(0)  # best precision at this recall or beyond
    idx = torch.searchsorted(recall.contiguous(), RECALLS, side="left")
    found = idx < recall.numel()
    out = torch.zeros_like(RECALLS)
    out[found] = envelope[idx[found]]
    return float(out.mean())


def average_precision(scores: torch.Tensor, correct: torch.Tensor, n_positive: int) -> float:
    """AP of detections ranked by `scores`, `correct[i]` saying whether detection i is a true
    positive, against `n_positive` ground-truth objects (nan when there are none)."""
    if n_positive == 0:
        return math.nan
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    tp = correct[order].double().cumsum(0)
    fp = (~correct[order].bool()).double().cumsum(0)
    return _interpolated(tp / (tp + fp).clamp(min=1), tp / n_positive)


def score_histograms(scores: torch.Tensor, correct: torch.Tensor, bins: int = 1000) -> torch.Tensor:
    """(2, bins) counts of true and false positives by score bin; scores in [0, 1]."""
    b = (scores.double().clamp(0, 1) * bins).long().clamp(max=bins - 1)
    correct = correct.bool()
    return torch.stack(
        [torch.bincount(b[correct], minlength=bins), torch.bincount(b[~correct], minlength=bins)]
    ).double()


def average_precision_from_histograms(hist: torch.Tensor, n_positive: float) -> float:
    """AP from `score_histograms` counts (summed over batches and ranks as they may be)."""
    if n_positive == 0:
        return math.nan
    tp, fp = hist[0].flip(0).cumsum(0), hist[1].flip(0).cumsum(0)  # highest bin first
    keep = (hist[0] + hist[1]).flip(0) > 0  # thresholds where something is detected
    tp, fp = tp[keep], fp[keep]
    return _interpolated(tp / (tp + fp).clamp(min=1), tp / n_positive)


def mean_ignoring_nan(values) -> float:
    """Mean over the classes that have ground truth (nan when none has)."""
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan
