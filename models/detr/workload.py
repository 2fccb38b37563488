"""DETR workload: set prediction of boxes and classes, trained with the Hungarian-matched
set loss (class cross-entropy with a down-weighted "no object" class, L1 and GIoU box
losses) on every decoder layer. The box losses are normalised as in the paper's code: by the
number of objects per rank averaged over all ranks, so every object weighs the same whichever
rank holds it.

Samples are an image (png, jpg or webp) of `model.image_size` pixels square and a JSON
record {"objects": [{"label": k, "box": [x0, y0, x1, y1]}, ...]} (boxes in pixels), any
number of objects, labels 0..`model.num_classes` - 1 (e.g. `launch.make_shards detection`).
Sample grids draw the detections on the first images of the run's val split (else test).

Evaluation is COCO-style mAP at IoU 0.5 (`map50`) and averaged over 0.5:0.95 (`map50_95`):
each query is one detection with its most likely class. The statistics are score
histograms (models/average_precision.py), so they sum over batches and ranks like every
other eval metric; final_metrics.json carries both for the test split.
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from data_pipelines.decode import IMAGE_FIELDS, fields  # not image_tensor: its resize and crop would move the boxes
from models import average_precision as AP
from models.base import Workload
from models.detr.boxes import cxcywh_to_xyxy, generalized_box_iou
from models.detr.matching import IOU_THRESHOLDS, hungarian_match, match_detections
from models.detr.net import DETR
from models.registry import register


@dataclass(kw_only=True)
class DETRConfig:
    name: str = "detr"
    num_classes: int = 3
    image_size: int = 64
    num_queries: int = 16
    d_model: int = 128
    heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 3
    ffn: int = 512
    dropout: float = 0.0
    backbone_width: int = 32
    aux_loss: bool = True  # the set loss on every decoder layer, not only the last
    no_object_weight: float = 0.1  # cross-entropy weight of "no object" (DETR's eos_coef)
    # matching costs and loss weights, as in the paper: class 1, L1 5, GIoU 2
    cost_class: float = 1.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    loss_ce: float = 1.0
    loss_l1: float = 5.0
    loss_giou: float = 2.0
    score_bins: int = 1000  # resolution of the mAP score histograms


def _fields(sample: dict) -> tuple[bytes, dict]:
    image = next((sample[k] for k in IMAGE_FIELDS if k in sample), None)
    if image is None or "json" not in sample:
        raise KeyError(
            f"sample {sample.get('__key__', '?')}: a detection sample needs an image "
            f"({'/'.join(IMAGE_FIELDS)}) and a 'json' record of its objects; it has {fields(sample)}"
        )
    return image, json.loads(sample["json"])


def detection_histograms(
    scores, classes, boxes, gt_labels: list, gt_boxes: list, num_classes: int, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive AP statistics of a batch: (num_classes, thresholds, 2, bins) true/false
    positive counts by score, and the (num_classes,) object counts. scores, classes (B, D)
    and boxes (B, D, 4) xyxy are the detections; gt_* one tensor per image (boxes xyxy)."""
    t = len(IOU_THRESHOLDS)
    hist = torch.zeros(num_classes, t, 2, bins, dtype=torch.float64)
    n_gt = torch.zeros(num_classes, dtype=torch.float64)
    for i in range(len(scores)):
        s, k, labels = scores[i].cpu(), classes[i].cpu(), gt_labels[i].cpu()
        n_gt += torch.bincount(labels, minlength=num_classes).double()
        correct = torch.from_numpy(match_detections(boxes[i].cpu(), s, k, gt_boxes[i].cpu(), labels))
        for c in k.unique().tolist():
            mine = k == c
            for j in range(t):
                hist[c, j] += AP.score_histograms(s[mine], correct[j][mine], bins)
    return hist, n_gt


def map_from_histograms(hist: torch.Tensor, n_gt: torch.Tensor) -> dict[str, float]:
    """COCO's summary numbers from `detection_histograms` sums: AP at IoU 0.5 and 0.75 and
    averaged over 0.5:0.95, each the mean over classes that have objects."""
    hist, n_gt = torch.as_tensor(hist), torch.as_tensor(n_gt)
    ap = [
        [AP.average_precision_from_histograms(hist[k, j], float(n_gt[k])) for j in range(hist.shape[1])]
        for k in range(hist.shape[0])
    ]
    at = list(IOU_THRESHOLDS)
    return {
        "map50": AP.mean_ignoring_nan(row[at.index(0.5)] for row in ap),
        "map75": AP.mean_ignoring_nan(row[at.index(0.75)] for row in ap),
        "map50_95": AP.mean_ignoring_nan(AP.mean_ignoring_nan(row) for row in ap),
    }


@register("detr")
class DETRWorkload(Workload):
    Config = DETRConfig
    best_metric = "map50_95"
    best_mode = "max"
    headline_metrics = ("map50", "map50_95")

    def build_model(self) -> nn.Module:
        c = self.cfg
        return DETR(
            num_classes=c.num_classes,
            num_queries=c.num_queries,
            d_model=c.d_model,
            heads=c.heads,
            enc_layers=c.enc_layers,
            dec_layers=c.dec_layers,
            ffn=c.ffn,
            dropout=c.dropout,
            backbone_width=c.backbone_width,
        )

    # ---------------------------------------------------------------- data
    def decode(self, sample: dict) -> dict:
        """-> {"image": (3, S, S) in [-1, 1], "labels": (G,), "boxes": (G, 4) normalized cx cy w h}."""
        png, record = _fields(sample)
        key, s = sample.get("__key__", "?"), self.cfg.image_size
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
        if img.shape[:2] != (s, s):
            raise ValueError(f"sample {key}: image is {img.shape[1]}x{img.shape[0]}, model.image_size is {s}")
        objects = record.get("objects")
        if not isinstance(objects, list):
            raise KeyError(f"sample {key}: its JSON record has no 'objects' list")
        labels = torch.tensor([o["label"] for o in objects], dtype=torch.long)
        boxes = torch.tensor([o["box"] for o in objects], dtype=torch.float32).reshape(-1, 4)
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < self.cfg.num_classes):
            raise ValueError(
                f"sample {key}: labels {labels.tolist()} outside 0..{self.cfg.num_classes - 1} (model.num_classes)"
            )
        if boxes.numel() and not ((boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= s):
            raise ValueError(f"sample {key}: boxes {boxes.tolist()} are not x0 < x1, y0 < y1 inside the {s}x{s} image")
        image = torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1
        return {
            "image": image,
            "labels": labels,
            "boxes": torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1) / s,
        }

    def collate(self, samples: list) -> dict:
        """Images stacked; labels and boxes stay one tensor per image (no padding to get wrong)."""
        return {
            "images": torch.stack([x["image"] for x in samples]),
            "labels": [x["labels"] for x in samples],
            "boxes": [x["boxes"] for x in samples],
        }

    # ---------------------------------------------------------------- loss
    def match(self, logits: torch.Tensor, boxes: torch.Tensor, labels: list, targets: list) -> list:
        """Hungarian matches of several decoder layers at once: logits (L, B, Q, C+1), boxes
        (L, B, Q, 4) -> L lists of B (query, object) index pairs. One cost matrix, so one
        device-to-host copy per step rather than one per layer."""
        c, n_layers, b = self.cfg, logits.shape[0], logits.shape[1]
        flat = hungarian_match(
            logits.flatten(0, 1),
            boxes.flatten(0, 1),
            labels * n_layers,
            targets * n_layers,
            w_class=c.cost_class,
            w_l1=c.cost_l1,
            w_giou=c.cost_giou,
        )
        return [flat[i * b : (i + 1) * b] for i in range(n_layers)]

    @staticmethod
    def num_boxes(labels: list, device: torch.device, *, across_ranks: bool = False) -> torch.Tensor:
        """The box losses' normaliser, DETR's num_boxes: the batch's object count, at least 1.
        `across_ranks` (training): the mean count over the ranks (all_reduce / world size, as
        the paper's code), so that with the ranks' losses averaged every object weighs the same
        whichever rank holds it. A collective then: every rank calls it every step, whatever
        its count; eval, whose ranks may run different batch counts, never does."""
        n = torch.tensor(float(sum(len(x) for x in labels)), device=device)
        if across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1)

    def set_loss(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        labels: list,
        targets: list,
        match: list | None = None,
        num_boxes: torch.Tensor | None = None,
    ) -> dict:
        """The set loss of one decoder layer's output: logits (B, Q, C+1), boxes (B, Q, 4);
        `match` from `match`, else matched here; the box losses are sums divided by
        `num_boxes` (default: this batch's object count, at least 1)."""
        c = self.cfg
        if match is None:
            match = self.match(logits[None], boxes[None], labels, targets)[0]
        n = self.num_boxes(labels, logits.device) if num_boxes is None else num_boxes
        b, q, k = logits.shape
        target_classes = torch.full((b, q), c.num_classes, dtype=torch.long, device=logits.device)
        rows = [torch.full_like(qi, i) for i, (qi, _) in enumerate(match)]
        bi, qi = torch.cat(rows).to(logits.device), torch.cat([m[0] for m in match]).to(logits.device)
        gt_labels = torch.cat([lab[g.to(lab.device)] for lab, (_, g) in zip(labels, match)])
        gt_boxes = torch.cat([t[g.to(t.device)] for t, (_, g) in zip(targets, match)]).float()
        target_classes[bi, qi] = gt_labels
        weight = torch.ones(k, device=logits.device)
        weight[-1] = c.no_object_weight
        ce = F.cross_entropy(logits.float().reshape(-1, k), target_classes.reshape(-1), weight)
        pred = boxes[bi, qi].float()
        l1 = (pred - gt_boxes).abs().sum() / n
        giou = (1 - generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt_boxes)).diagonal()).sum() / n
        return {"ce": ce, "l1": l1, "giou": giou, "total": c.loss_ce * ce + c.loss_l1 * l1 + c.loss_giou * giou}

    def _loss(self, model: nn.Module, batch: dict, across_ranks: bool = False) -> tuple[torch.Tensor, dict, tuple]:
        logits, boxes = model(batch["images"])
        if not self.cfg.aux_loss:
            logits, boxes = logits[-1:], boxes[-1:]
        num_boxes = self.num_boxes(batch["labels"], logits.device, across_ranks=across_ranks)
        matches = self.match(logits, boxes, batch["labels"], batch["boxes"])
        parts = [
            self.set_loss(logits[i], boxes[i], batch["labels"], batch["boxes"], matches[i], num_boxes)
            for i in range(len(logits))
        ]
        return sum(p["total"] for p in parts), parts[-1], (logits[-1], boxes[-1])

    throughput_unit = "images"

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self._loss(model, batch, across_ranks=True)[0]

    def flops_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        # the matching needs host values; its cost and the set loss's are elementwise. No
        # collective either: this runs on one rank (training_loss's num_boxes is one)
        logits, boxes = model(batch["images"])
        return logits.sum() + boxes.sum()

    # ---------------------------------------------------------------- eval
    @staticmethod
    def detections(logits: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One detection per query: (scores, classes, xyxy boxes), the score being the most
        likely real class's probability."""
        scores, classes = logits.float().softmax(-1)[..., :-1].max(-1)
        return scores, classes, cxcywh_to_xyxy(boxes.float())

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        total, last, (logits, boxes) = self._loss(model, batch)
        scores, classes, xyxy = self.detections(logits, boxes)
        hist, n_gt = detection_histograms(
            scores,
            classes,
            xyxy,
            batch["labels"],
            [cxcywh_to_xyxy(b.float()) for b in batch["boxes"]],
            self.cfg.num_classes,
            self.cfg.score_bins,
        )
        device, n = logits.device, torch.tensor(float(len(scores)), device=logits.device)
        return {
            "loss_sum": total.detach() * n,
            "ce_sum": last["ce"].detach() * n,
            "l1_sum": last["l1"].detach() * n,
            "giou_sum": last["giou"].detach() * n,
            "count": n,
            "hist": hist.to(device),
            "n_gt": n_gt.to(device),
        }

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        n = sums["count"]
        return {
            "loss": sums["loss_sum"] / n,
            "loss_ce": sums["ce_sum"] / n,
            "loss_l1": sums["l1_sum"] / n,
            "loss_giou": sums["giou_sum"] / n,
            **map_from_histograms(sums["hist"], sums["n_gt"]),
        }

    # ---------------------------------------------------------------- samples
    _grid: list | None = None  # the decoded samples the grid draws on

    def bind_splits(self, splits) -> None:
        super().bind_splits(splits)
        self._grid = None

    def held_out_images(self, n: int) -> list[dict]:
        """The first n decoded samples of the run's val split, else its test split
        (`bind_splits`), for the sample grid, read once; none without either."""
        if self._grid is None or len(self._grid) < n:
            split = self.first_split("val", "test")
            self._grid = (
                [] if split is None or n <= 0 else list(itertools.islice(self.splits[split](decode=self.decode), n))
            )
        return self._grid[:n]

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """The first n held-out images with the detections scoring over 0.5 drawn on them
        (black boxes); None without a val or test split."""
        scenes = self.held_out_images(n)
        if not scenes:
            return None
        device = next(model.parameters()).device
        x = torch.stack([s["image"] for s in scenes])
        logits, boxes = model(x.to(device))
        scores, classes, xyxy = self.detections(logits[-1], boxes[-1])
        out = []
        pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for p, s, b in zip(pixels, scores.cpu(), xyxy.cpu() * self.cfg.image_size):
            picture = Image.fromarray(p)
            pen = ImageDraw.Draw(picture)
            for box in b[s > 0.5].tolist():
                pen.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(0, 0, 0))
            out.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1))
        return torch.stack(out)
