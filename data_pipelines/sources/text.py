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

With a subword tokenizer (`tokenizer=`), each document is encoded and followed by the
tokenizer's separator id instead (`text_tokenizer.DocumentEncoder`), and the split's id stream
is cut the same way into windows of `seq_len + 1` ids (`ids.npy`), each with the number of
text bytes its targets stand for (`json`: {"bytes": N}), so bits per byte can be summed per
window. One file is encoded in pieces of about a megabyte cut after a newline.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sysconfig
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines.shards import samples_per_shard, write_shards

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SEPARATOR = b"\n\n"
PIECE = 1 << 20  # one file is tokenized in pieces of about this many bytes
TASK = 1 << 20  # text bytes per task handed to a tokenizing process
BYTES_PER_WORKER = 8 << 20  # the default --workers: one process per this much text, one per CPU at most


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


def _corpus(source: str, pattern: str, column: str | None, split: str | None) -> list[Document] | None:
    """The documents of `source`, or None for one file (split by bytes)."""
    path = Path(source)
    if source == "stdlib":
        return stdlib_documents()
    if column:
        return datasets_documents(source, column, split)
    if path.is_dir():
        return folder_documents(path, pattern)
    if path.is_file():
        return None
    raise FileNotFoundError(f"{source}: not 'stdlib', a folder or a file")


def _file_ranges(path: Path, val_fraction: float, test_fraction: float) -> dict[str, tuple[int, int]]:
    total = path.stat().st_size
    cut_val = int(total * (1 - val_fraction - test_fraction))
    cut_test = int(total * (1 - test_fraction))
    return {"train": (0, cut_val), "val": (cut_val, cut_test), "test": (cut_test, total)}


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError("--val-fraction and --test-fraction must be >= 0 and sum to < 1")


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
    tokenizer: str | Path | None = None,
    eos: str | None = None,
    workers: int | None = None,
) -> dict:
    """Write `out_dir/{train,val,test}` shard folders; returns {split: manifest + stats}.

    Byte windows, or with `tokenizer` (a tokenizer.json or tokenizer folder) windows of ids,
    documents separated by `eos` (default: the tokenizer's own), encoded by `workers`
    processes (default: from the corpus size and the CPUs; any number gives the same shards).
    Shards are sized so that each split has at least `min_shards` of them where it has
    that many windows, so up to that many ranks x workers can read it."""
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    _check_fractions(val_fraction, test_fraction)
    if tokenizer is None and (eos is not None or workers is not None):
        raise ValueError("--eos and --workers apply to tokenized text: give --tokenizer too")
    path = Path(source)
    docs = _corpus(source, pattern, column, split)
    if tokenizer is not None:
        return _build_tokenized(
            source,
            docs,
            Path(out_dir),
            seq_len=seq_len,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            tokenizer=tokenizer,
            eos=eos,
            workers=workers,
            min_shards=min_shards,
            maxsize=maxsize,
        )
    sep = SEPARATOR if docs is not None else b""

    if docs is None:  # one file: split by bytes
        ranges = _file_ranges(path, val_fraction, test_fraction)

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


# ---- tokenized text ----------------------------------------------------------------------


def _decode(data: bytes, name: str, not_utf8: list[str]) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        not_utf8.append(name)
        return data.decode(errors="replace")


def _char_start(f, at: int, end: int) -> int:
    """`at`, moved forward past UTF-8 continuation bytes, so a cut never splits a character."""
    f.seek(at)
    for byte in f.read(min(4, end - at)):
        if byte & 0xC0 != 0x80:
            break
        at += 1
    return at


def _file_parts(path: Path, lo: int, hi: int, not_utf8: list[str]) -> Iterator[tuple[tuple[str, bool, bool], int]]:
    """One file's byte range as one document, in pieces of about PIECE bytes cut after a
    newline (in a piece without one, before its last character)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        lo, hi = _char_start(f, lo, size), _char_start(f, hi, size)
        f.seek(lo)
        left, carry, start, first = hi - lo, b"", lo, True
        while True:
            block = f.read(min(PIECE, left))
            left -= len(block)
            data = carry + block
            cut = len(data)
            if left > 0:
                cut = (
                    data.rfind(b"\n") + 1
                    or next((i for i in range(len(data) - 1, 0, -1) if data[i] & 0xC0 != 0x80), 0)
                    or cut
                )
            piece, carry = data[:cut], data[cut:]
            yield (_decode(piece, f"{path} bytes {start}-{start + cut}", not_utf8), first, left <= 0), cut
            if left <= 0:
                return
            start, first = start + cut, False


def _tasks(parts: Iterable[tuple[tuple[str, bool, bool], int]]) -> Iterator[tuple[list, int]]:
    """Parts grouped into tasks of about TASK bytes: (parts, raw bytes)."""
    task, size = [], 0
    for part, raw in parts:
        task.append(part)
        size += raw
        if size >= TASK:
            yield task, size
            task, size = [], 0
    if task:
        yield task, size


def _encoded(tasks: Iterable[tuple[list, int]], encoder, pool, workers: int) -> Iterator[tuple]:
    """(ids, bytes per id, text bytes, raw bytes) per task, in order; a few tasks in flight per process."""
    from data_pipelines.text_tokenizer import encode_in_worker

    if pool is None:
        for parts, raw in tasks:
            yield (*encoder(parts), raw)
        return
    pending: deque = deque()
    for parts, raw in tasks:
        pending.append((pool.apply_async(encode_in_worker, (parts,)), raw))
        if len(pending) >= 2 * workers:
            result, raw = pending.popleft()
            yield (*result.get(), raw)
    while pending:
        result, raw = pending.popleft()
        yield (*result.get(), raw)


def default_workers(text_bytes: int) -> int:
    """Tokenizing processes for a corpus: one per BYTES_PER_WORKER of text, one per CPU at most."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, text_bytes // BYTES_PER_WORKER))


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _id_samples(ids, nbytes, seq_len: int, windows: int, split: str, dtype: str) -> Iterator[dict]:
    for i in range(windows):
        lo = i * seq_len
        yield {
            "__key__": f"{split}-{i:09d}",
            "ids.npy": _npy(np.asarray(ids[lo : lo + seq_len + 1], dtype=dtype)),
            "json": json.dumps({"bytes": int(nbytes[lo + 1 : lo + seq_len + 1].sum())}).encode(),
        }


class _Splits:
    """A source divided into train/val/test as `build` divides it, as text parts for a
    tokenizer: ((text, starts a document, ends a document), raw bytes)."""

    def __init__(self, source: str, docs: list[Document] | None, val_fraction: float, test_fraction: float):
        self.source, self.docs = source, docs
        self.fractions = {"train": 1.0, "val": val_fraction, "test": test_fraction}
        self.not_utf8: dict[str, list[str]] = {k: [] for k in SPLITS}
        if docs is None:
            self.ranges = _file_ranges(Path(source), val_fraction, test_fraction)
            self.sizes = {k: hi - lo for k, (lo, hi) in self.ranges.items()}
        else:
            self.by_split: dict[str, list[Document]] = {k: [] for k in SPLITS}
            for d in docs:
                self.by_split[split_of(d.name, val_fraction, test_fraction)].append(d)
            self.sizes = {k: sum(d.size for d in v) for k, v in self.by_split.items()}

    def wanted(self) -> list[str]:
        return [k for k in SPLITS if self.sizes[k] and self.fractions[k]]

    def parts(self, name: str) -> Iterator[tuple[tuple[str, bool, bool], int]]:
        if self.docs is None:
            yield from _file_parts(Path(self.source), *self.ranges[name], self.not_utf8[name])
            return
        for d in self.by_split[name]:
            data = d.read()
            yield (_decode(data, d.name, self.not_utf8[name]), True, True), len(data)


def _tokenize(parts, encoder, pool, workers: int, ids_file: Path, bytes_file: Path, bar) -> tuple[int, int]:
    """Encode `parts` into two flat uint32 files (ids, bytes per id): a split's stream can be
    larger than memory, and its window count must be known before shards are sized."""
    tokens = text_bytes = 0
    with open(ids_file, "wb") as fi, open(bytes_file, "wb") as fb:
        for ids, nbytes, n, raw in _encoded(_tasks(parts), encoder, pool, workers):
            ids.tofile(fi)
            nbytes.tofile(fb)
            tokens += len(ids)
            text_bytes += n
            bar.update(raw)
    return tokens, text_bytes


def _build_tokenized(
    source: str,
    docs: list[Document] | None,
    out: Path,
    *,
    seq_len: int,
    val_fraction: float,
    test_fraction: float,
    tokenizer: str | Path,
    eos: str | None,
    workers: int | None,
    min_shards: int,
    maxsize: float,
) -> dict:
    import multiprocessing

    from tqdm.auto import tqdm

    from data_pipelines.text_tokenizer import EOS_CANDIDATES, DocumentEncoder, install_encoder, load_tokenizer

    tok, info = load_tokenizer(tokenizer, eos=eos)
    if info.eos_id is None:
        raise ValueError(
            f"tokenizer {info.path}: no document separator (it has none of {', '.join(EOS_CANDIDATES)}); "
            "name one of its tokens with --eos TOKEN"
        )
    splits = _Splits(source, docs, val_fraction, test_fraction)
    if workers is None:
        workers = default_workers(sum(splits.sizes[k] for k in splits.wanted()))
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    encoder = DocumentEncoder(tok, info.eos_id)
    # spawned, not forked: fork() of a process with threads (tokenizers' pool, tqdm's monitor) can hang
    spawn = multiprocessing.get_context("spawn")
    pool = spawn.Pool(workers, initializer=install_encoder, initargs=(encoder,)) if workers > 1 else None
    out.mkdir(parents=True, exist_ok=True)
    manifests = {}
    try:
        for name in splits.wanted():
            with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}-tokens-") as tmp:
                ids_file, bytes_file = Path(tmp) / "ids", Path(tmp) / "bytes"
                bar = tqdm(
                    total=splits.sizes[name], desc=f"{name}: tokenizing", unit="B", unit_scale=True, mininterval=1
                )
                with bar:
                    tokens, text_bytes = _tokenize(
                        splits.parts(name), encoder, pool, workers, ids_file, bytes_file, bar
                    )
                if splits.not_utf8[name]:
                    bad = splits.not_utf8[name]
                    log.warning(
                        "%s: %d document(s) of the %s split are not UTF-8 (first: %s); their undecodable "
                        "bytes were replaced by U+FFFD",
                        source,
                        len(bad),
                        name,
                        bad[0],
                    )
                windows = (tokens - 1) // seq_len if tokens > seq_len else 0
                if windows == 0:
                    raise ValueError(
                        f"{source}: the {name} split has {tokens} tokens, fewer than one window of "
                        f"--seq-len {seq_len} + 1"
                    )
                ids = np.memmap(ids_file, np.uint32, "r")
                nbytes = np.memmap(bytes_file, np.uint32, "r")
                m = write_shards(
                    _id_samples(ids, nbytes, seq_len, windows, name, info.dtype),
                    out / name,
                    maxcount=samples_per_shard(windows, 1, min_shards),
                    maxsize=maxsize,
                    extra={
                        "tokenizer": info.manifest_entry(),
                        "seq_len": seq_len,
                        "dtype": info.dtype,
                        "tokens": tokens,
                        "text_bytes": text_bytes,
                    },
                )
                del ids, nbytes  # the memory maps, before their files go
            manifests[name] = {**m, "samples": windows, "dropped_tail_tokens": tokens - windows * seq_len - 1}
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return manifests


def split_texts(
    source: str,
    name: str = "train",
    *,
    val_fraction: float = 0.02,
    test_fraction: float = 0.02,
    pattern: str = "*",
    column: str | None = None,
    split: str | None = None,
) -> Iterator[str]:
    """The texts of one split of `source`, as `build` divides it (a tokenizer is trained on
    the train split's, so val and test stay unseen); one file comes in pieces."""
    _check_fractions(val_fraction, test_fraction)
    splits = _Splits(source, _corpus(source, pattern, column, split), val_fraction, test_fraction)
    for (text, _, _), _ in splits.parts(name):
        yield text
