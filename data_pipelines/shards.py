"""Writing WebDataset shards with a manifest, and reading the manifest back.

webdataset's ShardWriter does the tar work; what it lacks is a record of what it wrote.
The manifest (per-shard sample count, bytes, sha256) lets the reader know epoch sizes
without a scan and lets `verify_shards` catch a truncated or swapped shard.
`index_shards` writes the same manifest for tars that another tool wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from tqdm.auto import tqdm
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipelines.digest import file_digest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tributary-manifest/1"

# A training split needs a shard per reader (rank x loader worker) in every epoch; a
# modest multi-node run has this many. Eval splits are read by sample: any count serves.
TYPICAL_RUN = (2, 8, 4)  # nodes, GPUs per node, loader workers per GPU
TYPICAL_READERS = TYPICAL_RUN[0] * TYPICAL_RUN[1] * TYPICAL_RUN[2]
EVAL_SPLITS = ("val", "validation", "test", "eval", "dev")


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def safe_key(key: str) -> str:
    """webdataset splits a member name at its first dot, so a key must hold none; '/'
    would make folders inside the tar, which some readers mishandle."""
    return key.replace("/", "__").replace(".", "_")


def samples_per_shard(n: int, shards: int, min_shards: int = 0) -> int:
    """Samples per shard that cut `n` samples into `shards` shards, or into at least
    `min_shards` where that asks for more (and there are that many samples)."""
    if min_shards > shards:
        return max(1, n // min_shards)
    return max(1, -(-n // shards))


def few_shards_warning(folder: str | os.PathLike, num_shards: int, split: str = "") -> str | None:
    """One line when a training split (named by `split`, else by its folder) has fewer
    shards than a typical run has readers."""
    if (split or Path(folder).name).lower() in EVAL_SPLITS or num_shards >= TYPICAL_READERS:
        return None
    nodes, gpus, workers = TYPICAL_RUN
    return (
        f"warning: {folder}: {num_shards} shard(s), fewer than the {nodes} nodes x {gpus} GPUs x "
        f"{workers} workers = {TYPICAL_READERS} readers of a typical run; at most {num_shards} "
        f"readers (ranks x data.num_workers) can share this split"
    )


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "shard",
    maxcount: int = 10_000,
    maxsize: float = 256e6,
    extra: dict | None = None,
) -> dict:
    """Write `samples` (dicts with `__key__` and extension-named fields) as tar shards.

    Shards are named `<prefix>-000000.tar`, ... in `out_dir`; `manifest.json` is written
    last, so a folder with a manifest is a finished one. `extra` adds entries to it (what
    the samples are: a tokenizer, a sequence length).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    written: list[tuple[str, int]] = []
    pattern = str(out / f"{prefix}-%06d.tar")

    # An integer mtime keeps tarfile from adding a PAX header to every member (webdataset
    # stamps fractional time.time() otherwise): half the bytes, about twice the read
    # speed, and the same sha256 when the same samples are written again.
    writer = wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0)
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
        shards.append(
            {
                "url": os.path.basename(fname),
                "samples": count,
                "bytes": os.path.getsize(fname),
                "sha256": sha256_file(fname),
            }
        )
    return _write_manifest(out, shards, extra)


def _write_manifest(folder: Path, shards: list[dict], extra: dict | None = None) -> dict:
    manifest = {
        "format": MANIFEST_FORMAT,
        "total_samples": sum(s["samples"] for s in shards),
        "shards": shards,
        **(extra or {}),
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return manifest


class _HashingReader:
    """A file that hashes what is read from it, so a shard is counted and hashed in one read."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        block = self.f.read(size)
        self.sha256.update(block)
        self.bytes += len(block)
        return block

    def finish(self) -> str:
        while self.read(1 << 20):  # the tar reader may stop before the end-of-archive padding
            pass
        return self.sha256.hexdigest()


def count_samples(path: str | os.PathLike) -> tuple[int, int, str]:
    """(samples, bytes, sha256) of one tar, grouping members by key as webdataset does."""
    keys: set[str] = set()
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            members = tar_file_expander([{"url": str(path), "stream": reader}], eof_value=None)
            for sample in group_by_keys(members):
                if sample["__key__"] in keys:
                    raise ValueError(
                        f"key '{sample['__key__']}' appears twice, apart: webdataset would read it as two samples"
                    )
                keys.add(sample["__key__"])
        except Exception as exc:
            raise ValueError(
                f"{path}: cannot read as a WebDataset tar ({type(exc).__name__}: {exc.args[0] if exc.args else exc})"
            ) from exc
        digest = reader.finish()
    return len(keys), reader.bytes, digest


def index_shards(folder: str | os.PathLike, pattern: str = "*.tar") -> dict:
    """Write manifest.json for existing tars (e.g. img2dataset's webdataset output).

    The tars are only read, never renamed or rewritten, so other tools keep working on
    them. Tars holding no samples are left out of the manifest with a warning.
    """
    folder = Path(folder)
    paths = sorted(folder.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"{folder}: no files match '{pattern}'")
    shards = []
    for path in tqdm(paths, desc="shards", unit="shard", disable=None):
        samples, size, digest = count_samples(path)
        if samples == 0:
            log.warning("%s: no samples; left out of the manifest", path)
            continue
        shards.append({"url": path.relative_to(folder).as_posix(), "samples": samples, "bytes": size, "sha256": digest})
    if not shards:
        raise ValueError(f"{folder}: none of the {len(paths)} tar(s) holds a sample")
    return _write_manifest(folder, shards)


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
