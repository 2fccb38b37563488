"""DETR: box arithmetic, the Hungarian matching and COCO-style AP against hand-computed
cases; decode and collate of variable-length object sets; the set loss; a 2-rank run that
is killed and resumes exactly; and (drill) the default recipe's mAP."""

from __future__ import annotations

import io
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, kill_past_checkpoint

from models import average_precision as AP
from models.detr.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from models.detr.matching import IOU_THRESHOLDS, hungarian_match, match_detections, matching_cost
from models.detr.workload import DETRConfig, DETRWorkload
from trainer.metrics import read_jsonl

T = torch.tensor


def test_box_conversions_round_trip():
    b = T([[0.5, 0.5, 0.2, 0.4]])
    assert torch.allclose(cxcywh_to_xyxy(b), T([[0.4, 0.3, 0.6, 0.7]]))
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(b)), b)


def test_iou_and_giou_hand_cases():
    a = T([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 4, 4]])
    b = T([[1.0, 1, 3, 3], [2, 0, 3, 1], [1, 1, 3, 3]])
    iou, _ = box_iou(a, b)
    giou = generalized_box_iou(a, b)
    # overlapping: intersection 1, union 7, hull 3x3 = 9
    assert iou[0, 0].item() == pytest.approx(1 / 7) and giou[0, 0].item() == pytest.approx(1 / 7 - 2 / 9)
    # disjoint: IoU 0, hull 3x1 = 3, union 2
    assert iou[1, 1].item() == 0 and giou[1, 1].item() == pytest.approx(-1 / 3)
    # nested: IoU 4/16 and the hull is the outer box, so GIoU = IoU
    assert iou[2, 2].item() == pytest.approx(0.25) and giou[2, 2].item() == pytest.approx(0.25)
    assert torch.allclose(generalized_box_iou(a, a).diagonal(), torch.ones(3))
    assert (giou >= -1).all() and (giou <= iou + 1e-7).all()


def test_matching_cost_hand_case():
    probs = T([[0.7, 0.2, 0.1]])  # classes 0, 1 and "no object"
    boxes, targets = T([[0.5, 0.5, 0.2, 0.2]]), T([[0.6, 0.5, 0.2, 0.2]])
    # L1 0.1; xyxy [.4,.4,.6,.6] vs [.5,.4,.7,.6]: IoU 0.02/0.06, hull 0.3 x 0.2 = union: GIoU = 1/3
    cost = matching_cost(probs, boxes, T([1]), targets)
    assert cost.item() == pytest.approx(-1 * 0.2 + 5 * 0.1 - 2 * (1 / 3), abs=1e-6)


def test_hungarian_picks_the_swapped_queries_and_skips_the_far_one():
    targets = [T([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]])]
    boxes = T([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 3)
    q, g = hungarian_match(logits, boxes, [T([0, 1])], targets)[0]
    assert dict(zip(q.tolist(), g.tolist())) == {0: 1, 2: 0}


def test_hungarian_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for n_obj in (1, 2, 3, 4):
        logits, boxes = torch.randn(1, 5, 4, generator=g), torch.rand(1, 5, 4, generator=g) * 0.5 + 0.1
        labels, targets = torch.randint(3, (n_obj,), generator=g), torch.rand(n_obj, 4, generator=g) * 0.5 + 0.1
        cost = matching_cost(logits[0].softmax(-1), boxes[0], labels, targets)
        q, o = hungarian_match(logits, boxes, [labels], [targets])[0]
        best = min(sum(cost[p[j], j].item() for j in range(n_obj)) for p in itertools.permutations(range(5), n_obj))
        assert sorted(o.tolist()) == list(range(n_obj))
        assert cost[q, o].sum().item() == pytest.approx(best, abs=1e-5)


def test_hungarian_with_images_without_objects():
    empty, one = torch.zeros(0, dtype=torch.long), T([2])
    match = hungarian_match(
        torch.zeros(2, 4, 4), torch.rand(2, 4, 4), [empty, one], [torch.zeros(0, 4), T([[0.5, 0.5, 0.2, 0.2]])]
    )
    assert match[0][0].numel() == 0 and match[1][1].tolist() == [0]


def test_match_detections_hand_case():
    gt = T([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    boxes = T(
        [
            [0.0, 0, 10, 10],  # object 0 exactly
            [0, 0, 10, 12],  # IoU 0.83 with object 0, which is taken: duplicate
            [20, 20, 30, 36],  # IoU 100/160 = 0.625 with object 1
            [20, 20, 30, 30],
        ]
    )  # object 1 exactly, but the wrong class
    correct = match_detections(boxes, T([0.9, 0.8, 0.7, 0.95]), T([0, 0, 0, 1]), gt, T([0, 0]))
    assert correct.shape == (len(IOU_THRESHOLDS), 4)
    assert correct[:, 0].all() and not correct[:, 1].any() and not correct[:, 3].any()
    assert correct[:, 2].tolist() == [t <= 0.6 for t in IOU_THRESHOLDS]


def test_lower_scored_detection_gets_the_object_at_strict_thresholds():
    gt = T([[0.0, 0, 10, 10]])
    boxes = T([[0.0, 0, 10, 16], [0, 0, 10, 11]])  # IoU 0.625, then 0.909
    correct = match_detections(boxes, T([0.9, 0.5]), T([0, 0]), gt, T([0]))
    assert correct[:, 0].tolist() == [t <= 0.6 for t in IOU_THRESHOLDS]
    assert correct[:, 1].tolist() == [0.6 < t <= 0.9 for t in IOU_THRESHOLDS]


def test_average_precision_hand_case():
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1: the envelope is 1 up to recall 0.5
    # (51 of COCO's 101 recall points) and 2/3 after (50 points)
    ap = AP.average_precision(T([0.9, 0.8, 0.7]), T([True, False, True]), 2)
    assert ap == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert AP.average_precision(T([0.9, 0.1]), T([True, True]), 4) == pytest.approx(51 / 101)  # recall 0.5
    assert math.isnan(AP.average_precision(T([0.5]), T([False]), 0))
    assert AP.mean_ignoring_nan([0.5, math.nan, 1.0]) == 0.75


def test_histogram_ap_agrees_with_exact_ap():
    g = torch.Generator().manual_seed(1)
    for n, p in ((50, 0.7), (2000, 0.3)):
        scores = torch.rand(n, generator=g)
        correct = torch.rand(n, generator=g) < p * scores + 0.1
        n_pos = int(correct.sum()) + 5  # some objects never found
        exact = AP.average_precision(scores, correct, n_pos)
        halves = [AP.score_histograms(scores[i::2], correct[i::2]) for i in range(2)]  # two "ranks"
        assert AP.average_precision_from_histograms(halves[0] + halves[1], n_pos) == pytest.approx(exact, abs=2e-3)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="png")
    return buf.getvalue()


def _sample(n_objects: int, key="k") -> dict:
    from PIL import Image

    from data_pipelines.sources.shapes import BACKGROUND

    objects = [{"label": i % 3, "box": [4 + 20 * i, 4, 14 + 20 * i, 20]} for i in range(n_objects)]
    return {
        "__key__": key,
        "png": _png(Image.new("RGB", (64, 64), BACKGROUND)),
        "json": json.dumps({"size": 64, "objects": objects}).encode(),
    }


def test_decode_and_collate_keep_each_images_objects():
    w = DETRWorkload(DETRConfig())
    batch = w.collate([w.decode(_sample(n, f"s{n}")) for n in (0, 3, 1)])
    assert batch["images"].shape == (3, 3, 64, 64)
    assert [len(x) for x in batch["labels"]] == [0, 3, 1] and [len(x) for x in batch["boxes"]] == [0, 3, 1]
    assert batch["labels"][1].tolist() == [0, 1, 2]
    # box [24, 4, 34, 20] of 64 pixels -> cx cy w h
    assert torch.allclose(batch["boxes"][1][1], T([29, 12, 10, 16]) / 64)
    model = w.build_model()
    loss = w.training_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.queries.weight.grad.abs().sum() > 0


def test_decode_names_bad_samples():
    w = DETRWorkload(DETRConfig())
    s = _sample(1, "bad1")
    del s["json"]
    with pytest.raises(KeyError, match=r"bad1.*'json' record.*\['png'\]"):
        w.decode(s)
    s = _sample(1, "bad2")
    s["json"] = json.dumps({"objects": [{"label": 5, "box": [0, 0, 4, 4]}]}).encode()
    with pytest.raises(ValueError, match="bad2.*model.num_classes"):
        w.decode(s)
    with pytest.raises(ValueError, match="model.image_size is 32"):
        DETRWorkload(DETRConfig(image_size=32)).decode(_sample(1))


def test_perfect_predictions_score_map_one_and_the_set_loss_is_small():
    w = DETRWorkload(DETRConfig(num_queries=4))
    batch = w.collate([w.decode(_sample(n)) for n in (3, 1, 2)])

    class Oracle(torch.nn.Module):
        """Query j of image i predicts object j when there is one, else "no object"."""

        def forward(self, images):
            logits, boxes = torch.full((1, 3, 4, 4), -10.0), torch.full((1, 3, 4, 4), 0.5)
            logits[..., 3] = 10
            for i, (lab, box) in enumerate(zip(batch["labels"], batch["boxes"])):
                logits[0, i, : len(lab), 3] = -10
                logits[0, i, torch.arange(len(lab)), lab] = 10
                boxes[0, i, : len(lab)] = box
            return logits, boxes

    sums = w.eval_sums(Oracle(), batch)
    metrics = w.eval_metrics({k: v.item() if v.dim() == 0 else v for k, v in sums.items()})
    assert metrics["map50"] == pytest.approx(1.0) and metrics["map50_95"] == pytest.approx(1.0)
    assert metrics["loss_l1"] < 1e-6 and metrics["loss_giou"] < 1e-6 and metrics["loss_ce"] < 1e-3
    assert sums["n_gt"].tolist() == [3, 2, 1]  # labels 0 1 2, 0, 0 1


# ---------------------------------------------------------------- the box losses' normaliser
NORM_COUNTS = [
    ([3, 2], [1, 0]),  # objects per image of rank 0 and rank 1, one step a row:
    ([2, 2], [0, 0]),
]  # rank 1 has few objects, then none (it still joins the all_reduce)
NORM_CFG = {"num_queries": 4, "loss_ce": 0.0}  # CE is a per-rank mean in DETR too: not compared


class PerImage(torch.nn.Module):
    """Fixed random outputs of 2 decoder layers for each image, by its id (pixel 0): the same
    for an image whichever batch or rank it is in."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images):
        logits, boxes = [], []
        for i in images[:, 0, 0, 0].long().tolist():
            g = torch.Generator().manual_seed(i)
            logits.append(torch.randn(2, 4, 4, generator=g))
            boxes.append(
                torch.cat(
                    [torch.rand(2, 4, 2, generator=g) * 0.5 + 0.25, torch.rand(2, 4, 2, generator=g) * 0.2 + 0.1], -1
                )
            )
        return torch.stack(logits, 1) * self.scale, torch.stack(boxes, 1)


def norm_batch(step: int, rank: int) -> dict:
    """The images of `rank` at `step` (ids step*4 + rank*2 + 0, 1) and their objects."""
    counts = NORM_COUNTS[step][rank]
    ids = [step * 4 + rank * 2 + j for j in range(len(counts))]
    images = torch.zeros(len(ids), 3, 8, 8)
    images[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
    labels, boxes = [], []
    for i, n in zip(ids, counts):
        g = torch.Generator().manual_seed(1000 + i)
        labels.append(torch.randint(3, (n,), generator=g))
        boxes.append(
            torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.2 + 0.1], 1)
        )
    return {"images": images, "labels": labels, "boxes": boxes}


def norm_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One of 2 gloo ranks: the normaliser and the training loss of its batch at each step."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )  # a rank left out of a collective fails, not hangs
    try:
        w, model, got = DETRWorkload(DETRConfig(**NORM_CFG)), PerImage(), []
        for step in range(len(NORM_COUNTS)):
            batch = norm_batch(step, rank)
            n = w.num_boxes(batch["labels"], torch.device("cpu"), across_ranks=True).item()
            got.append([n, w.training_loss(model, batch).item()])
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def test_box_losses_are_normalised_by_the_mean_object_count_over_ranks(tmp_path):
    """2 gloo ranks holding different numbers of objects (one none): each divides its box
    losses by the mean count over the ranks, so the ranks' mean loss (what DDP's averaged
    gradients descend) is the one-process loss of both batches together; dividing by each
    rank's own count, as before, is not."""
    torch.multiprocessing.spawn(norm_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    w, model = DETRWorkload(DETRConfig(**NORM_CFG)), PerImage()
    for step, counts in enumerate(NORM_COUNTS):
        assert ranks[0][step][0] == ranks[1][step][0] == max(sum(map(sum, counts)) / 2, 1)
        a, b = norm_batch(step, 0), norm_batch(step, 1)
        together = {
            "images": torch.cat([a["images"], b["images"]]),
            "labels": a["labels"] + b["labels"],
            "boxes": a["boxes"] + b["boxes"],
        }
        single = w.training_loss(model, together).item()  # one process: all the objects at once
        assert (ranks[0][step][1] + ranks[1][step][1]) / 2 == pytest.approx(single, rel=1e-6)
        own_counts = (w.training_loss(model, a).item() + w.training_loss(model, b).item()) / 2
        assert abs(own_counts - single) > 0.1 * single, (own_counts, single)
    assert w.num_boxes([T([], dtype=torch.long)], torch.device("cpu"), across_ranks=True).item() == 1  # clamped


# ---------------------------------------------------------------- sample grids
def _scene_shards(folder, boxes: list, background, size=32):
    """Shards of plain size x size images, each with one object (label 4) in the given box."""
    from data_pipelines.shards import write_shards

    samples = (
        {
            "__key__": f"s{i:03d}",
            "png": np.full((size, size, 3), background, np.uint8),
            "json": {"objects": [{"label": 4, "box": box}]},
        }
        for i, box in enumerate(boxes)
    )
    write_shards(samples, folder, maxcount=2)


def test_sample_grid_draws_on_held_out_images_of_any_size(tmp_path):
    """The grid is the first images of the val split (else test) with the confident
    detections drawn on: any image size and class count, no generator of its own."""
    import ast
    import functools

    from data_pipelines.stream import iter_samples, resolve_shards

    val_boxes = [[2, 3, 12, 10], [10, 10, 30, 31], [0, 0, 8, 8]]
    _scene_shards(tmp_path / "val", val_boxes, (200, 210, 220))
    _scene_shards(tmp_path / "test", [[4, 4, 9, 9]] * 2, (90, 90, 90))
    w = DETRWorkload(DETRConfig(image_size=32, num_classes=5, num_queries=3))

    def bind(**folders):
        w.bind_splits(
            {k: functools.partial(iter_samples, resolve_shards(str(tmp_path / v)).urls) for k, v in folders.items()}
        )

    class Oracle(torch.nn.Module):
        """Query 0 finds the val image's object (sure of it), the others see nothing."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, images):
            n = len(images)
            logits, boxes = torch.full((1, n, 3, 6), -10.0), torch.full((1, n, 3, 4), 0.5)
            logits[..., 5] = 10
            for i in range(n):
                x0, y0, x1, y1 = val_boxes[i]
                logits[0, i, 0, 4], logits[0, i, 0, 5] = 10, -10
                boxes[0, i, 0] = T([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / 32
            return logits, boxes

    assert w.sample_images(Oracle(), 2, torch.Generator()) is None  # no held-out split: nothing to draw on
    bind(train="test", val="val", test="test")
    grid = w.sample_images(Oracle(), 5, torch.Generator())
    assert grid.shape == (3, 3, 32, 32)  # all the val split has
    for picture, (x0, y0, x1, y1) in zip(grid, val_boxes):
        assert picture[:, y0, x0].tolist() == [0, 0, 0] and picture[:, y1 - 1, x1 - 1].tolist() == [0, 0, 0]
        inside = picture[:, (y0 + y1) // 2, (x0 + x1) // 2]
        assert inside.tolist() == pytest.approx([200 / 255, 210 / 255, 220 / 255])
    bind(test="test")
    assert w.sample_images(Oracle(), 1, torch.Generator())[0, :, 20, 20].tolist() == pytest.approx([90 / 255] * 3)

    tree = ast.parse((ROOT / "models/detr/workload.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not [m for m in modules if m and m.startswith(("data_pipelines.sources", "trainer", "launch"))]


SMALL = [
    "model.backbone_width=8",
    "model.d_model=32",
    "model.heads=2",
    "model.ffn=64",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.num_queries=8",
    "data.batch_size=8",
    "data.eval_batch_size=20",
    "data.num_workers=1",
    "data.shuffle_buffer=50",
    "trainer.max_steps=12",
    "trainer.log_every=1",
    "trainer.eval_every=6",
    "trainer.checkpoint_every=4",
    "trainer.sample_every=0",
    "trainer.num_samples=4",
    "trainer.progress_bar=false",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    from data_pipelines.sources import shape_scenes

    out = tmp_path_factory.mktemp("scenes")
    shape_scenes.build(out, counts={"train": (240, 0), "val": (40, 1), "test": (40, 2)})
    return out


def _torchrun(run_dir, scenes):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/detr/shapes.yaml"),
        f"run.dir={run_dir}",
        f"data.train.urls={scenes}/train",
        f"data.val.urls={scenes}/val",
        f"data.test.urls={scenes}/test",
        *SMALL,
    ]


def _run(cmd, env, timeout=600):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_two_ranks_killed_and_resumed_match_an_unbroken_run(tmp_path, scenes_dir, cpu_env):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    with open(tmp_path / "unbroken.log", "w") as log:  # the unbroken run goes alongside: CI time
        unbroken = subprocess.Popen(
            _torchrun(ref, scenes_dir), cwd=ROOT, env=cpu_env, stdout=log, stderr=subprocess.STDOUT
        )
        kill_past_checkpoint(_torchrun(killed, scenes_dir), cpu_env, killed, checkpoint=4, past=6)
        assert "resumed from" in _run(_torchrun(killed, scenes_dir), cpu_env)
        assert unbroken.wait(timeout=300) == 0, (tmp_path / "unbroken.log").read_text()[-3000:]

    def series(d):
        return [(r["step"], r["train/loss"]) for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]

    assert len(series(ref)) == 12 and series(killed) == series(ref)
    final = {d: json.loads((d / "final_metrics.json").read_text()) for d in (ref, killed)}
    assert final[ref] == final[killed]
    assert 0 <= final[ref]["map50_95"] <= final[ref]["map50"] <= 1
    assert final[ref]["map50"] == final[ref]["test/map50"]


@pytest.mark.drill
@pytest.mark.timeout(1500)
def test_default_recipe_reaches_map50(tmp_path, cpu_env):
    """The default recipe on 2 CPU ranks, on the full scenes data (`make data-detr`)."""
    data = ROOT / "data/shapes-det"
    if not (data / "test/manifest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "launch.make_shards", "detection", "--out", str(data)], cwd=ROOT, check=True
        )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/detr/shapes.yaml"),
        f"run.dir={tmp_path}",
        "trainer.progress_bar=false",
    ]
    _run(cmd, cpu_env, timeout=1400)  # about 11.5 minutes on 2 cores
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["map50"] >= 0.5, final


def test_map_agrees_with_pycocotools():
    """Our histogram mAP against COCO's own evaluator on noisy detections of random scenes:
    near-misses, duplicates, wrong classes and misses, 60 images, 3 classes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from models.detr.workload import detection_histograms, map_from_histograms

    g = torch.Generator().manual_seed(3)
    images, annotations, results = [], [], []
    scores, classes, boxes, gt_labels, gt_boxes = [], [], [], [], []
    for i in range(60):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 40
        gt = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 16], 1)
        lab = torch.randint(3, (n,), generator=g)
        of = torch.randint(n, (12,), generator=g)  # the object each detection is near (some twice)
        det = gt[of] + torch.randn(12, 4, generator=g) * 1.5
        det[8:] = torch.tensor([30.0, 30, 50, 50]) + torch.randn(4, 4, generator=g) * 8  # junk
        det[:, 2:] = torch.maximum(det[:, 2:], det[:, :2] + 1)
        cls = torch.where(torch.rand(12, generator=g) < 0.8, lab[of], torch.randint(3, (12,), generator=g))
        sc = torch.rand(12, generator=g)
        images.append({"id": i, "width": 64, "height": 64})
        for b, k in zip(gt.tolist(), lab.tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": k,
                    "iscrowd": 0,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "area": (b[2] - b[0]) * (b[3] - b[1]),
                }
            )
        for b, k, s in zip(det.tolist(), cls.tolist(), sc.tolist()):
            results.append(
                {"image_id": i, "category_id": k, "score": s, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            )
        scores.append(sc), classes.append(cls), boxes.append(det), gt_labels.append(lab), gt_boxes.append(gt)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": k} for k in range(3)]}
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(results), "bbox")
    ev.evaluate(), ev.accumulate()
    # precision[T, R, K, area "all", maxDets 100]: COCO's AP per threshold and class
    precision = ev.eval["precision"][:, :, :, 0, 2]
    hist = [
        detection_histograms(
            scores[i : i + 20],
            classes[i : i + 20],
            boxes[i : i + 20],
            gt_labels[i : i + 20],
            gt_boxes[i : i + 20],
            3,
            1000,
        )
        for i in (0, 20, 40)
    ]  # three "batches"
    ours = map_from_histograms(sum(h for h, _ in hist), sum(n for _, n in hist))
    assert ours["map50"] == pytest.approx(precision[0].mean(), abs=2e-3)
    assert ours["map75"] == pytest.approx(precision[5].mean(), abs=2e-3)
    assert ours["map50_95"] == pytest.approx(precision.mean(), abs=2e-3)
    assert 0.2 < ours["map50_95"] < ours["map50"] < 0.95  # neither trivial nor hopeless
