"""Frame-feature streams with action segments: the generated data of online action detection
(OadTR and its GRU baseline), written as the windows an online detector sees.

Each split is a set of streams ("videos") of per-frame feature vectors (FEATURE_DIM floats,
what a frozen video backbone would give). A stream alternates background gaps (class 0,
GAP frames) and action segments (one of ACTION_CLASSES classes 1..K, ACTION frames, both
lengths uniform and varying). What makes a frame's class identifiable:

- background frames sit around a background prototype: easy to tell from action frames;
- the first ONSET frames of a segment show the class's own signature clearly;
- the later frames show a "motion" prototype shared by the two classes of a pair (1-2,
  3-4, ...) and nothing of the class itself, under unit Gaussian noise in every dimension
  (as on every frame).

So a later frame tells the pair but not the class within it: that comes only from the
onset, up to ACTION[1] - 1 frames back (always inside a window of WINDOW frames). History
matters; a detector that misreads the noisy onset gets the whole segment wrong. Each stream
also carries a constant random offset (its "scene"), the same on every frame. Prototypes
are drawn once from a fixed seed and are shared by every split; the splits differ in their
streams' seeds. Everything comes from seeded numpy generators (PCG64), so a build is the
same on every machine. About 57 MB of shards (float16), built in ~8 s.

A sample is the window of the last WINDOW frames ending at one frame (`npy`, float16,
(WINDOW, FEATURE_DIM); frames before the stream's start are zeros), with a `json` record of
that frame's class (`label`), the classes of the next ANTICIPATION frames (`future`, -1
past the stream's end: no target) and where it comes from (`stream`, `frame`). Every frame
of every stream is the current frame of exactly one window. The train split is written in
a seeded random order (neighbouring windows overlap almost entirely, and a shuffle buffer
would otherwise see runs of them); val and test in stream order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipelines.shards import MANIFEST, samples_per_shard, write_shards

ACTION_CLASSES = 8  # K; class 0 is background
FEATURE_DIM = 16
WINDOW = 32  # T: frames an online detector sees, the current one last
ANTICIPATION = 8  # l_d: future frames whose classes each sample carries
ONSET = 3  # frames at the start of a segment that show the class clearly
ACTION = (8, 28)  # segment length range, frames (inclusive); < WINDOW keeps the onset in view
GAP = (4, 20)  # background gap length range, frames (inclusive)
PROTOTYPE_NORM = 3.0  # norm of the signature, motion and background prototypes
SCENE_STD = 0.3  # per-dimension std of a stream's constant offset
PROTOTYPE_SEED = 1234

# split: (streams, frames per stream, seed)
SPLITS = {"train": (30, 400, 0), "val": (6, 400, 1), "test": (12, 400, 2)}
SHARDS_PER_SPLIT = 8


def prototypes() -> dict[str, np.ndarray]:
    """Background (D,), class signatures (K + 1, D; row 0 unused) and pair motions (K + 1, D;
    classes 2i+1 and 2i+2 share one), each of norm PROTOTYPE_NORM."""
    rng = np.random.default_rng(PROTOTYPE_SEED)

    def unit(n):
        v = rng.standard_normal((n, FEATURE_DIM))
        return PROTOTYPE_NORM * v / np.linalg.norm(v, axis=1, keepdims=True)

    background, signature = unit(1)[0], unit(ACTION_CLASSES + 1)
    pair_motion = unit((ACTION_CLASSES + 1) // 2)
    motion = np.stack([pair_motion[(c - 1) // 2] if c else np.zeros(FEATURE_DIM) for c in range(ACTION_CLASSES + 1)])
    return {"background": background, "signature": signature, "motion": motion}


def segments(rng: np.random.Generator, length: int) -> list[tuple[int, int, int]]:
    """(class, start, end) of the action segments of one stream: a gap first, then actions
    and gaps in turn; a segment cut by the stream's end is kept as it is."""
    out, t = [], int(rng.integers(GAP[0], GAP[1] + 1))
    while t < length:
        n = int(rng.integers(ACTION[0], ACTION[1] + 1))
        out.append((int(rng.integers(1, ACTION_CLASSES + 1)), t, min(t + n, length)))
        t += n + int(rng.integers(GAP[0], GAP[1] + 1))
    return out


def stream(rng: np.random.Generator, length: int, protos: dict) -> tuple[np.ndarray, np.ndarray]:
    """One stream: features (length, D) float32 and per-frame classes (length,) int64."""
    labels = np.zeros(length, np.int64)
    mean = np.tile(protos["background"], (length, 1))
    for c, start, end in segments(rng, length):
        labels[start:end] = c
        onset_end = min(start + ONSET, end)
        mean[start:onset_end] = protos["signature"][c]
        mean[onset_end:end] = protos["motion"][c]
    scene = SCENE_STD * rng.standard_normal(FEATURE_DIM)
    noise = rng.standard_normal((length, FEATURE_DIM))
    return (mean + scene + noise).astype(np.float32), labels


def windows(features: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, np.ndarray, int, list[int]]]:
    """(frame, window (WINDOW, D) float16, its class, the next ANTICIPATION classes) for every
    frame; zeros before the stream's start, -1 past its end."""
    length = len(labels)
    history = np.zeros((WINDOW - 1, features.shape[1]), features.dtype)
    padded = np.concatenate([history, features]).astype(np.float16)
    future = np.concatenate([labels, np.full(ANTICIPATION, -1, np.int64)])
    for t in range(length):
        yield t, padded[t : t + WINDOW], int(labels[t]), future[t + 1 : t + 1 + ANTICIPATION].tolist()


def split_streams(split: str, counts: dict | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The streams of one split, as (features, labels)."""
    n_streams, length, seed = (counts or SPLITS)[split]
    protos = prototypes()
    return [stream(np.random.default_rng([seed, i]), length, protos) for i in range(n_streams)]


def build(out_dir: str | Path, *, counts: dict | None = None, min_shards: int = 0) -> dict[str, dict]:
    """Write train/val/test shard folders under `out_dir`; returns their manifests.
    `counts` replaces SPLITS (split: (streams, frames per stream, seed)), e.g. for tests."""
    manifests = {}
    for split in counts or SPLITS:
        samples = []
        for s, (features, labels) in enumerate(split_streams(split, counts)):
            for t, window, label, future in windows(features, labels):
                samples.append(
                    {
                        "__key__": f"{split}-s{s:03d}-f{t:05d}",
                        "npy": window,
                        "json": {"stream": s, "frame": t, "label": label, "future": future},
                    }
                )
        if split == "train":
            order = np.random.default_rng([PROTOTYPE_SEED, 7]).permutation(len(samples))
            samples = [samples[i] for i in order]
        manifests[split] = write_shards(
            iter(samples), Path(out_dir) / split, maxcount=samples_per_shard(len(samples), SHARDS_PER_SPLIT, min_shards)
        )
    return manifests


def is_built(out_dir: str | Path) -> bool:
    return all((Path(out_dir) / split / MANIFEST).exists() for split in SPLITS)
