"""Samples/s of our resumable stream against webdataset's own pipeline, same shards.

    .venv/bin/python -m benchmarks.stream_throughput [--shards DIR] [--samples N] [--repeats R]

Both read the same tars, decode the same PNGs the same way and batch them, in one process
(no loader workers), so the ratio is the cost of our ordering, shuffle buffer and position
bookkeeping. Repeats alternate the two and report medians. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_batches(iterator, n_batches: int) -> float:
    start = time.perf_counter()
    for _ in itertools.islice(iterator, n_batches):
        pass
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", default="data/digits/train")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import webdataset as wds

    from data_pipelines.sources import digits
    from data_pipelines.stream import ShardStream, resolve_shards
    from models.autoregressive import MADEConfig, MADEWorkload

    if not Path(args.shards, "manifest.json").exists():
        digits.build(Path(args.shards).parent)
    shards = resolve_shards(args.shards)
    workload = MADEWorkload(MADEConfig())
    n_batches = args.samples // args.batch_size

    def ours():
        return iter(
            ShardStream(
                shards,
                decode=workload.decode,
                collate=workload.collate,
                batch_size=args.batch_size,
                seed=0,
                shuffle_buffer=256,
                rank=0,
                world_size=1,
                num_workers=1,
            )
        )

    def plain():
        return iter(
            wds.WebDataset(shards.urls, shardshuffle=False, empty_check=False)
            .repeat()
            .shuffle(256)
            .map(workload.decode)
            .batched(args.batch_size, collation_fn=workload.collate)
        )

    times = {"ours": [], "webdataset": []}
    for _ in range(args.repeats):
        times["ours"].append(time_batches(ours(), n_batches))
        times["webdataset"].append(time_batches(plain(), n_batches))
    samples = n_batches * args.batch_size
    result = {
        "samples": samples,
        "ours_samples_per_s": samples / statistics.median(times["ours"]),
        "webdataset_samples_per_s": samples / statistics.median(times["webdataset"]),
    }
    result["stream_vs_webdataset"] = result["ours_samples_per_s"] / result["webdataset_samples_per_s"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
