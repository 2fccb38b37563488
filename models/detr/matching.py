"""DETR's two matchings.

`hungarian_match`: training. Each image's queries are assigned one-to-one to its objects
by scipy's linear_sum_assignment on  w_class * (-p(class)) + w_l1 * L1 + w_giou * (-GIoU);
unassigned queries are to predict "no object".

`match_detections`: evaluation, as COCO does it. Per image and IoU threshold, detections in
falling score order each take the unclaimed object of their class they overlap most, if
that IoU reaches the threshold; the rest are false positives.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from models.detr.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)  # COCO's 0.5:0.95


def matching_cost(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    *,
    w_class: float = 1.0,
    w_l1: float = 5.0,
    w_giou: float = 2.0,
) -> torch.Tensor:
    """(Q, G) cost of giving query q object g. probs (Q, C+1) softmax; boxes (Q, 4) and
    targets (G, 4) in normalized cx, cy, w, h; labels (G,)."""
    return (
        -w_class * probs[:, labels]
        + w_l1 * torch.cdist(boxes, targets, p=1)
        - w_giou * generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(targets))
    )


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor, boxes: torch.Tensor, labels: list[torch.Tensor], targets: list[torch.Tensor], **weights
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, (query indices, object indices) of the cheapest one-to-one assignment.
    logits (B, Q, C+1), boxes (B, Q, 4); labels[i] (G_i,), targets[i] (G_i, 4)."""
    b, q = logits.shape[:2]
    sizes = [len(x) for x in labels]
    out = [(torch.zeros(0, dtype=torch.long),) * 2 for _ in sizes]
    if sum(sizes) == 0:
        return out
    # every query against every object of the batch in one go, then one block per image
    cost = (
        matching_cost(
            logits.float().softmax(-1).flatten(0, 1),
            boxes.float().flatten(0, 1),
            torch.cat(labels),
            torch.cat(targets).float(),
            **weights,
        )
        .view(b, q, -1)
        .cpu()
        .numpy()
    )
    start = 0
    for i, n in enumerate(sizes):
        if n:
            rows, cols = linear_sum_assignment(cost[i, :, start : start + n])
            out[i] = (torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long))
        start += n
    return out


def match_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    thresholds=IOU_THRESHOLDS,
) -> np.ndarray:
    """(T, D) booleans: detection d is a true positive at IoU threshold t. One image; boxes
    xyxy; each object is claimed by at most one detection per threshold."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    correct = np.zeros((len(thresholds), len(scores)), dtype=bool)
    if len(scores) == 0 or len(gt_labels) == 0:
        return correct
    iou = box_iou(boxes.double(), gt_boxes.double())[0].cpu().numpy()
    same = classes.cpu().numpy()[:, None] == gt_labels.cpu().numpy()[None, :]
    iou = np.where(same, iou, -1.0)  # another class never matches
    claimed = np.zeros((len(thresholds), len(gt_labels)), dtype=bool)
    rows = np.arange(len(thresholds))
    for d in np.argsort(-scores.cpu().numpy(), kind="stable"):
        free = np.where(claimed | (iou[d][None, :] < thresholds[:, None]), -1.0, iou[d][None, :])
        best = free.argmax(1)
        hit = free[rows, best] >= 0
        correct[hit, d] = True
        claimed[rows[hit], best[hit]] = True
    return correct
