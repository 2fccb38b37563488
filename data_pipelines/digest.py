"""File digests, shared by the shard manifests (sha256) and the checkpoint markers (xxh3-128:
~24 GB/s on one core here against sha256's ~1.8, benchmarks/RESULTS.md checkpoint_scale)."""

from __future__ import annotations

import hashlib
import os

BLOCK = 8 << 20


def file_digest(path: str | os.PathLike, algo: str) -> str:
    """Hex digest of a file read in 8 MiB blocks into one reused buffer; `algo` is xxh3_128 or
    any hashlib name."""
    if algo == "xxh3_128":
        import xxhash

        h = xxhash.xxh3_128()
    else:
        h = hashlib.new(algo)
    block = bytearray(BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            h.update(view[:n])
    return h.hexdigest()
