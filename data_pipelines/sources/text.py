"""Text corpora as shards of contiguous byte windows, for byte-level language models.

Sources: `stdlib` (the Python standard library's `.py` sources plus pydoc's topic texts:
every Python install ships them, so the default corpus needs no download), a folder of
text files, one large file (enwik8, a PG-19 book), or a text column of a `datasets`
dataset (a `save_to_disk` folder or local files).

Documents are split into train/val/test by a hash of their name (deterministic, the same
on every machine); one file is split by bytes instead (its last fractions are val and
test, the enwik8 convention). Each split is one byte stream (documents joined by a blank
line) cut into samples of `seq_len + 1` bytes with stride `seq_len`: consecutive samples
share one byte, so every byte but the first is a prediction target exactly once. The tail
shorter than a window is dropped and reported.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.shards import write_shards

SPLITS = ("train", "val", "test")
SEPARATOR = b"\n\n"


@dataclass
class Document:
    name: str  # stable across machines: decides the split
    size: int  # bytes, for planning shard sizes (an estimate is fine)
    read: Callable[[], bytes]


def stdlib_documents() -> list[Document]:
    """The standard library's Python sources (site-packages excluded) and pydoc topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if p.is_file() and "site-packages" not in p.parts and "__pycache__" not in p.parts
    )
    docs = [Document(p.relative_to(root).as_posix(), p.stat().st_size, p.read_bytes) for p in files]
    try:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            text = topics[name].encode()
            docs.append(Document(f"pydoc_topics/{name}", len(text), lambda t=text: t))
    except ImportError:  # some distributions strip pydoc_data
        pass
    return docs


def folder_documents(folder: Path, pattern: str) -> list[Document]:
    files = sorted(p for p in folder.rglob(pattern) if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder}: no files match '{pattern}'")
    return [Document(p.relative_to(folder).as_posix(), p.stat().st_size, p.read_bytes) for p in files]


def datasets_documents(source: str, column: str, split: str | None) -> list[Document]:
    from data_pipelines.sources.hf import load_source

    ds = load_source(source, split)
    if column not in ds.column_names:
        raise ValueError(f"{source}: no column '{column}' (it has {', '.join(ds.column_names)})")
    col = ds[column]
    return [Document(f"row{i}", len(text or ""), lambda t=text: (t or "").encode()) for i, text in enumerate(col)]


def split_of(name: str, val_fraction: float, test_fraction: float) -> str:
    u = int(hashlib.sha1(name.encode()).hexdigest()[:12], 16) / 16**12
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


class Windows:
    """Cuts a byte stream into windows of `seq_len + 1` with stride `seq_len`."""

    def __init__(self, seq_len: int):
        self.seq_len, self.buf, self.dropped, self.emitted = seq_len, bytearray(), 0, 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        self.buf += data
        n = self.seq_len
        start = 0
        while len(self.buf) - start >= n + 1:
            yield bytes(self.buf[start : start + n + 1])
            self.emitted += 1
            start += n
        del self.buf[:start]

    def close(self) -> None:
        # the buffer starts with the last window's final byte, which is not lost
        self.dropped = len(self.buf) - (1 if self.emitted else 0)


def _samples(chunks: Iterable[bytes], seq_len: int, split: str, stats: dict) -> Iterator[dict]:
    windows = Windows(seq_len)
    i = 0
    for chunk in chunks:
        for w in windows.feed(chunk):
            yield {"__key__": f"{split}-{i:09d}", "bin": w}
            i += 1
    windows.close()
    stats[split] = {"samples": i, "dropped_tail_bytes": windows.dropped}


def _bar(total_bytes: int, desc: str):
    """A byte progress bar for splits big enough to take more than a few seconds."""
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, mininterval=1.0, disable=total_bytes < 50e6)


def build(
    source: str,
    out_dir: str | Path,
    *,
    seq_len: int,
    val_fraction: float = 0.02,
    test_fraction: float = 0.02,
    pattern: str = "*",
    column: str | None = None,
    split: str | None = None,
    min_shards: int = 16,
    maxsize: float = 256e6,
) -> dict:
    """Write `out_dir/{train,val,test}` shard folders; returns {split: manifest + stats}.

    Shards are sized so that each split has at least `min_shards` of them where it has
    that many windows, so up to that many ranks x workers can read it."""
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError("--val-fraction and --test-fraction must be >= 0 and sum to < 1")
    path = Path(source)
    sep = SEPARATOR
    if source == "stdlib":
        docs = stdlib_documents()
    elif column:
        docs = datasets_documents(source, column, split)
    elif path.is_dir():
        docs = folder_documents(path, pattern)
    elif path.is_file():
        docs, sep = None, b""
    else:
        raise FileNotFoundError(f"{source}: not 'stdlib', a folder or a file")

    if docs is None:  # one file: split by bytes
        total = path.stat().st_size
        cut_val = int(total * (1 - val_fraction - test_fraction))
        cut_test = int(total * (1 - test_fraction))
        ranges = {"train": (0, cut_val), "val": (cut_val, cut_test), "test": (cut_test, total)}

        def chunks(name: str) -> Iterator[bytes]:
            lo, hi = ranges[name]
            with open(path, "rb") as f, _bar(hi - lo, name) as bar:
                f.seek(lo)
                left = hi - lo
                while left > 0 and (data := f.read(min(1 << 20, left))):
                    left -= len(data)
                    bar.update(len(data))
                    yield data

        sizes = {k: hi - lo for k, (lo, hi) in ranges.items()}
    else:
        by_split: dict[str, list[Document]] = {k: [] for k in SPLITS}
        for d in docs:
            by_split[split_of(d.name, val_fraction, test_fraction)].append(d)
        sizes = {k: sum(d.size + len(sep) for d in v) for k, v in by_split.items()}

        def chunks(name: str) -> Iterator[bytes]:
            with _bar(sizes[name], name) as bar:
                for d in by_split[name]:
                    data = d.read() + sep
                    bar.update(len(data))
                    yield data

    out, stats, manifests = Path(out_dir), {}, {}
    for name in SPLITS:
        expected = max(1, (sizes[name] - 1) // seq_len)
        if sizes[name] == 0 or (name != "train" and (val_fraction if name == "val" else test_fraction) == 0):
            continue
        maxcount = max(1, math.ceil(expected / min_shards))
        try:
            m = write_shards(
                _samples(chunks(name), seq_len, name, stats), out / name, maxcount=maxcount, maxsize=maxsize
            )
        except ValueError as exc:
            if "no samples" in str(exc):
                raise ValueError(
                    f"{source}: the {name} split has {sizes[name]} bytes, fewer than "
                    f"one window of --seq-len {seq_len} + 1"
                ) from None
            raise
        manifests[name] = {**m, **stats[name]}
    return manifests
