"""Box arithmetic for DETR: (cx, cy, w, h) <-> (x0, y0, x1, y1), pairwise IoU and
generalized IoU (Rezatofighi et al. 2019). Boxes are rows of a (N, 4) tensor; x1 >= x0.
Our own because torchvision, which has them, cannot be installed beside the CPU torch
(docs/platform-notes.md)."""

from __future__ import annotations

import torch


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, M) IoU of xyxy boxes, and the (N, M) union areas."""
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return inter / union.clamp(min=1e-12), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) GIoU = IoU - (hull - union) / hull, in [-1, 1]; hull: the smallest box
    enclosing both."""
    iou, union = box_iou(a, b)
    lo = torch.minimum(a[:, None, :2], b[None, :, :2])
    hi = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    hull = (hi - lo).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-12)
