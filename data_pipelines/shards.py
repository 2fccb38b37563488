"""Writing WebDataset shards with a manifest, and reading the manifest back.

webdataset's ShardWriter does the tar work; what it lacks is a record of what it wrote.
The manifest (per-shard sample count, bytes, sha256) lets the reader know epoch sizes
without a scan and lets `verify_shards` catch a truncated or swapped shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import webdataset as wds

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tributary-manifest/1"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "shard",
    maxcount: int = 10_000,
    maxsize: float = 256e6,
) -> dict:
    """Write `samples` (dicts with `__key__` and extension-named fields) as tar shards.

    Shards are named `<prefix>-000000.tar`, ... in `out_dir`; `manifest.json` is written
    last, so a folder with a manifest is a finished one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    written: list[tuple[str, int]] = []
    pattern = str(out / f"{prefix}-%06d.tar")

    writer = wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0)
    writer.post = lambda fname: written.append((fname, writer.count))
    keys: set[str] = set()
    try:
        for sample in samples:
            key = sample.get("__key__")
            if not key:
                raise ValueError(f"sample without __key__ (fields: {sorted(sample)})")
            if key in keys:
                raise ValueError(f"duplicate sample key '{key}'")
            keys.add(key)
            writer.write(sample)
    finally:
        writer.close()
    if not keys:
        raise ValueError(f"no samples were given to write to {out}")

    shards = []
    for fname, count in written:
        if count == 0:  # ShardWriter opens its first shard eagerly
            os.remove(fname)
            continue
        shards.append({
            "url": os.path.basename(fname),
            "samples": count,
            "bytes": os.path.getsize(fname),
            "sha256": sha256_file(fname),
        })
    manifest = {
        "format": MANIFEST_FORMAT,
        "total_samples": sum(s["samples"] for s in shards),
        "shards": shards,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def verify_shards(folder: str | os.PathLike) -> list[str]:
    """Check every shard of a folder against its manifest; returns one line per problem."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    for shard in manifest["shards"]:
        path = folder / shard["url"]
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        elif sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems
