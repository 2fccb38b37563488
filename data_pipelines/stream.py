"""The resumable sample stream over WebDataset shards.

webdataset reads the tars (URL opening, `pipe:`, grouping files into samples); what it
lacks is a position that survives a restart (FACTS.md: no state_dict in 1.0.2), so the
order is ours and is a pure function of (seed, rank, world size, workers):

* epoch e permutes all shards with rng(seed, e); rank r reads perm[r::W]; loader worker w
  of that rank reads those[w::K]. Every shard of an epoch goes to exactly one reader.
* each reader shuffles samples through a buffer seeded by (seed, e, r, w), then decodes,
  then batches. Its stream runs through epoch after epoch without end, so every rank has
  a next batch at every step however uneven the shards are: no DDP hang, nothing dropped
  or padded. Within a reader's epoch each of its samples comes exactly once.
* the DataLoader takes batches from its workers round-robin, so after n batches reader w
  has made ceil((n - w) / K) of them. The whole position is therefore the number of
  batches the trainer consumed; resuming regenerates each worker's stream and skips what
  it had already made (whole epochs skipped by manifest counts, the current epoch by
  reading without decoding).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from data_pipelines.shards import MANIFEST, read_manifest


class DataError(RuntimeError):
    """A data problem, naming the shard and sample at fault."""


@dataclass
class ShardList:
    urls: list[str]
    samples_per_shard: Optional[list[int]]  # from the manifest, when there is one

    @property
    def total_samples(self) -> Optional[int]:
        return sum(self.samples_per_shard) if self.samples_per_shard is not None else None


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def resolve_shards(spec: str, manifest: str = "", *, key: str = "data.urls") -> ShardList:
    """Turn a recipe's `urls` into a shard list.

    `spec` is a folder holding shards and a manifest.json (as launch.make_shards writes),
    or URLs with brace expansion, several joined by '::'. `key` names the config key in
    errors.
    """
    if not spec:
        raise DataError(f"{key}: empty URL list")
    if _is_local(spec) and Path(spec).is_dir():
        mpath = Path(manifest) if manifest else Path(spec) / MANIFEST
        if not mpath.exists():
            raise DataError(f"{key}: folder '{spec}' has no {MANIFEST}; give a brace list of "
                            "shards instead, or write the folder with launch.make_shards")
        m = read_manifest(mpath)
        return ShardList([str(Path(spec) / s["url"]) for s in m["shards"]],
                         [s["samples"] for s in m["shards"]])

    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    if not urls:
        raise DataError(f"{key}: '{spec}' expands to no URLs")
    counts = None
    mpath = Path(manifest) if manifest else None
    if mpath is None and _is_local(urls[0]):
        candidate = Path(urls[0]).parent / MANIFEST
        mpath = candidate if candidate.exists() else None
    if mpath is not None:
        m = read_manifest(mpath)
        by_name = {s["url"]: s["samples"] for s in m["shards"]}
        names = [os.path.basename(u) for u in urls]
        if all(n in by_name for n in names):
            counts = [by_name[n] for n in names]
    for url in urls:
        if _is_local(url) and not Path(url).exists():
            raise DataError(f"{key}: shard '{url}' does not exist")
    return ShardList(urls, counts)


def iter_raw_samples(urls: list[str]) -> Iterator[dict]:
    """Raw samples (undecoded bytes per extension) of `urls`, in order."""
    for url in urls:
        try:
            yield from tarfile_samples([{"url": url}])
        except Exception as exc:
            raise DataError(f"shard '{url}': cannot read ({type(exc).__name__}: {exc})") from exc


def decode_or_explain(decode: Callable[[dict], Any], sample: dict) -> Any:
    try:
        return decode(sample)
    except Exception as exc:
        raise DataError(f"sample '{sample.get('__key__')}' in shard '{sample.get('__url__')}': "
                        f"cannot decode ({type(exc).__name__}: {exc})") from exc


def shuffled(samples: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Deterministic shuffle buffer: fill, then emit a random slot and refill it."""
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < buffer_size:
            buf.append(sample)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], sample = sample, buf[j]
        yield sample
    rng.shuffle(buf)
    yield from buf


def check_readers(num_shards: int, world_size: int, num_workers: int, *, key: str) -> None:
    """Every (rank, worker) reader needs a shard of its own in every epoch."""
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise DataError(f"{key}: {num_shards} shard(s) cannot feed {world_size} rank(s) x "
                        f"{max(1, num_workers)} worker(s) = {readers} readers; write more, "
                        "smaller shards or lower data.num_workers")


def _worker_batches_before(n_batches: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` made among the first `n_batches` (round-robin order)."""
    return max(0, -(-(n_batches - worker) // num_workers))


class ShardStream(IterableDataset):
    """Endless batches for one rank; see the module docstring for the order."""

    def __init__(self, shards: ShardList, *, decode: Callable[[dict], Any],
                 collate: Callable[[list], Any], batch_size: int, seed: int,
                 shuffle_buffer: int, rank: int, world_size: int, num_workers: int,
                 key: str = "data.train.urls"):
        check_readers(len(shards.urls), world_size, num_workers, key=key)
        self.shards = shards
        self.decode, self.collate = decode, collate
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.start_batch = 0  # batches this rank consumed before now; set on resume

    def reader_shards(self, epoch: int, worker: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards.urls))
        return [int(i) for i in perm[self.rank::self.world_size][worker::self.num_workers]]

    def reader_samples(self, worker: int, skip: int = 0) -> Iterator[Any]:
        """Decoded samples of one reader, endless, after skipping `skip` of them."""
        counts = self.shards.samples_per_shard
        for epoch in itertools.count():
            idx = self.reader_shards(epoch, worker)
            if counts is not None:
                n = sum(counts[i] for i in idx)
                if skip >= n:
                    skip -= n
                    continue
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
            raw = iter_raw_samples([self.shards.urls[i] for i in idx])
            empty = True
            for sample in shuffled(raw, self.shuffle_buffer, rng):
                empty = False
                if skip:
                    skip -= 1
                    continue
                yield decode_or_explain(self.decode, sample)
            if empty:
                raise DataError(f"rank {self.rank} worker {worker}: shards "
                                f"{[self.shards.urls[i] for i in idx]} hold no samples")

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info else (0, 1)
        if nworkers != self.num_workers:
            raise DataError(f"stream built for {self.num_workers} workers runs in {nworkers}")
        # The DataLoader restarts its round-robin at worker 0, so after n batches worker
        # w plays the reader that owned global batch n + w in the uninterrupted order.
        reader = (worker + self.start_batch) % nworkers
        done = _worker_batches_before(self.start_batch, reader, nworkers)
        batch = []
        for sample in self.reader_samples(reader, skip=done * self.batch_size):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []


class StreamLoader:
    """A rank's training batches, counting what the trainer consumed.

    `state_dict()` is the data position saved in checkpoints; the DataLoader is only built
    at the first batch, after `load_state_dict()` had its chance.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int, prefetch_factor: int = 4):
        self.stream, self.num_workers, self.prefetch_factor = stream, num_workers, prefetch_factor
        self.batches = 0
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self.stream.start_batch = self.batches
            kwargs = {}
            if self.num_workers > 0:
                kwargs = dict(prefetch_factor=self.prefetch_factor, persistent_workers=True)
            loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                # own generator: building the loader must not draw from
                                # the global RNG, or a resumed run's RNG would drift
                                generator=torch.Generator().manual_seed(self.stream.seed),
                                **kwargs)
            self._it = iter(loader)
        batch = next(self._it)
        self.batches += 1
        return batch

    @property
    def samples_seen(self) -> int:
        """Samples consumed by all ranks (equal batch counts on every rank)."""
        return self.batches * self.stream.batch_size * self.stream.world_size

    @property
    def epoch(self) -> Optional[float]:
        total = self.stream.shards.total_samples
        return self.samples_seen / total if total else None

    def state_dict(self) -> dict:
        s = self.stream
        return {"batches": self.batches, "batch_size": s.batch_size, "seed": s.seed,
                "rank": s.rank, "world_size": s.world_size, "num_workers": s.num_workers,
                "shuffle_buffer": s.shuffle_buffer, "num_shards": len(s.shards.urls),
                "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        if self._it is not None:
            raise RuntimeError("load_state_dict after iteration started")
        s = self.stream
        now = {"batch_size": s.batch_size, "seed": s.seed, "world_size": s.world_size,
               "num_workers": s.num_workers, "shuffle_buffer": s.shuffle_buffer,
               "num_shards": len(s.shards.urls)}
        for key, value in now.items():
            if state[key] != value:
                raise DataError(
                    f"rank {s.rank}: the checkpoint's data position was made with {key}="
                    f"{state[key]}, this run has {value}; exact resume needs the same "
                    "shards, seed, batch size, world size and workers (elastic resume is "
                    "not supported yet)")
        self.batches = int(state["batches"])


def eval_batches(shards: ShardList, *, decode: Callable[[dict], Any],
                 collate: Callable[[list], Any], batch_size: int, rank: int,
                 world_size: int) -> Iterator[Any]:
    """One ordered pass over an eval split; sample i goes to rank i % world_size.

    Splitting by sample (not shard) lets a small eval set of one shard serve any world
    size; ranks get batch counts that may differ by one, so callers reduce sums, never
    run a collective per batch.
    """
    batch = []
    for i, sample in enumerate(iter_raw_samples(shards.urls)):
        if i % world_size != rank:
            continue
        batch.append(decode_or_explain(decode, sample))
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)
