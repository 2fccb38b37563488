"""Hugging Face `datasets` -> shards: one sample per row, one field per mapped column.

Columns are mapped to WebDataset extensions (`image:png,caption:txt`) or, without a
mapping, by feature type. Images already stored in the target format are copied as they
are, so a JPEG dataset written as jpg loses nothing to a second compression.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from data_pipelines.shards import safe_key, samples_per_shard, write_shards

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}  # extension -> PIL format
EXTENSIONS = (*IMAGE_FORMATS, "txt", "json", "npy", "cls")


def parse_columns(spec: str) -> dict[str, str]:
    """'image:png,caption:txt,url:url.txt' -> {column: field}.

    A field is an extension, or NAME.EXTENSION when two columns share an extension
    (webdataset reads `<key>.url.txt` as field 'url.txt').
    """
    columns = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, field = item.rpartition(":")
        if not sep or not name:
            raise ValueError(f"--columns item '{item}': expected COLUMN:EXTENSION")
        columns[name] = check_field(field, name)
    if not columns:
        raise ValueError(f"--columns '{spec}' names no column")
    return columns


def check_field(field: str, column: str) -> str:
    """The field name as webdataset will read it back (lower case, jpeg -> jpg)."""
    prefix, _, ext = field.lower().rpartition(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in EXTENSIONS:
        raise ValueError(f"column '{column}': extension '{ext}' is not one of {', '.join(EXTENSIONS)}")
    if "/" in prefix:
        raise ValueError(f"column '{column}': field '{field}' must not contain '/'")
    return f"{prefix}.{ext}" if prefix else ext


def _auto_extension(feature) -> str | None:
    import datasets as hf

    if isinstance(feature, hf.Image):
        return "png"
    if isinstance(feature, hf.ClassLabel):
        return "cls"
    if isinstance(feature, (dict, hf.Json)):
        return "json"
    if isinstance(feature, hf.Value):
        if feature.dtype in ("string", "large_string"):
            return "txt"
        if feature.dtype.startswith(("int", "uint")):
            return "cls"
        if feature.dtype.startswith("float") or feature.dtype == "bool":
            return "json"
        return None
    if isinstance(feature, (hf.Array2D, hf.Array3D, hf.Array4D, hf.Array5D)):
        return "npy"
    if isinstance(feature, (hf.List, hf.LargeList)):
        leaf = feature
        while isinstance(leaf, (hf.List, hf.LargeList)):
            leaf = leaf.feature
        numeric = isinstance(leaf, hf.Value) and leaf.dtype.startswith(("int", "uint", "float", "bool"))
        return "npy" if numeric else "json"
    return None


def auto_columns(features) -> dict[str, str]:
    """Every column's field from its feature type; columns that share an extension get
    their name in front (`caption.txt`, `url.txt`). Fails on a type with no obvious one."""
    exts = {}
    for name, feature in features.items():
        exts[name] = _auto_extension(feature)
        if exts[name] is None:
            raise ValueError(
                f"column '{name}' ({feature!r}) has no automatic extension; "
                "pass --columns to choose the columns and their extensions"
            )
    shared = {e for e, n in Counter(exts.values()).items() if n > 1}
    return {name: f"{safe_key(name).lower()}.{ext}" if ext in shared else ext for name, ext in exts.items()}


def _encode_image(value: Any, ext: str) -> bytes:
    if isinstance(value, dict):  # an Image feature read with decode=False
        data = value.get("bytes") or Path(value["path"]).read_bytes()
        img = Image.open(io.BytesIO(data))
        if img.format == IMAGE_FORMATS[ext]:
            return data
    elif isinstance(value, Image.Image):
        img = value
    else:
        img = Image.fromarray(np.asarray(value))
    if ext == "jpg" and img.mode not in ("L", "RGB"):  # JPEG stores neither alpha nor palettes
        img = img.convert("RGB" if "R" in img.getbands() or img.mode == "P" else "L")
    out = io.BytesIO()
    img.save(out, format=IMAGE_FORMATS[ext])
    return out.getvalue()


def encode_value(value: Any, field: str) -> bytes:
    """A column value as the bytes of a `<key>.<field>` file."""
    ext = field.rpartition(".")[2]
    if ext in IMAGE_FORMATS:
        return _encode_image(value, ext)
    if ext == "txt":
        if not isinstance(value, str):
            raise TypeError(f"txt needs a string, got {type(value).__name__}")
        return value.encode("utf-8")
    if ext == "cls":
        if not isinstance(value, (int, np.integer)):
            raise TypeError(f"cls needs an integer, got {type(value).__name__}")
        return str(int(value)).encode()
    if ext == "json":
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    if ext == "npy":
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"npy needs numbers, got an array of {array.dtype}")
        out = io.BytesIO()
        np.save(out, array, allow_pickle=False)
        return out.getvalue()
    raise ValueError(f"unknown extension '{ext}'")


def dataset_to_shards(
    ds,
    out_dir: str | os.PathLike,
    *,
    columns: dict[str, str] | None = None,
    key_column: str | None = None,
    maxcount: int = 10_000,
    maxsize: float = 256e6,
    min_shards: int = 0,
) -> dict:
    """Write a `datasets.Dataset` as shards with a manifest (at least `min_shards` shards
    where it has that many rows); returns the manifest.

    `columns` maps column -> field (see `parse_columns`); None maps every column by its
    type. Keys are `key_column`'s values, else the zero-padded row index. A null value
    leaves its field out of that sample (a warning counts them per column).
    """
    import datasets as hf

    if len(ds) == 0:
        raise ValueError("the dataset has no rows")
    columns = {c: check_field(f, c) for c, f in columns.items()} if columns else auto_columns(ds.features)
    if len(set(columns.values())) < len(columns):
        raise ValueError(f"two columns map to the same field: {columns}; name one, e.g. 'url:url.txt'")
    needed = list(dict.fromkeys([*columns, *([key_column] if key_column else [])]))
    for name in needed:
        if name not in ds.features:
            raise ValueError(f"column '{name}' is not in the dataset (it has {', '.join(ds.features)})")
    ds = ds.select_columns(needed).with_format(None)
    for name, feature in ds.features.items():
        if isinstance(feature, hf.Image):  # stored bytes, so matching formats are not re-encoded
            ds = ds.cast_column(name, hf.Image(decode=False))

    nulls: Counter = Counter()
    empty_rows: list[str] = []  # a sample without fields would vanish from the tar
    width = max(6, len(str(len(ds) - 1)))

    def samples() -> Iterator[dict]:
        for i, row in enumerate(tqdm(ds, desc="rows", unit="row", disable=None)):
            key = safe_key(str(row[key_column])) if key_column else f"{i:0{width}d}"
            sample = {"__key__": key}
            for name, field in columns.items():
                if row[name] is None:
                    nulls[name] += 1
                    continue
                try:
                    sample[field] = encode_value(row[name], field)
                except Exception as exc:
                    raise ValueError(
                        f"row {i} (key '{key}'), column '{name}' -> {field}: {type(exc).__name__}: {exc}"
                    ) from exc
            if len(sample) > 1:
                yield sample
            else:
                empty_rows.append(key)

    maxcount = min(maxcount, samples_per_shard(len(ds), 1, min_shards))
    manifest = write_shards(samples(), out_dir, maxcount=maxcount, maxsize=maxsize)
    for name, n in nulls.items():
        log.warning("column '%s': %d null value(s); those samples have no '%s' field", name, n, columns[name])
    if empty_rows:
        log.warning("%d row(s) with nothing but nulls left out (first: key '%s')", len(empty_rows), empty_rows[0])
    return manifest


def load_source(source: str, split: str | None = None):
    """A `save_to_disk` folder, another local folder `load_dataset` understands (parquet,
    csv, imagefolder, ...) or a hub name; a DatasetDict is narrowed to `split`."""
    import datasets as hf

    path = Path(source)
    if source.startswith(("/", ".", "~")) and not path.exists():
        raise FileNotFoundError(f"{source}: no such folder")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        ds = hf.load_from_disk(source)
        if isinstance(ds, hf.DatasetDict):
            split = split or "train"
            if split not in ds:
                raise ValueError(f"{source}: no split '{split}' (it has {', '.join(ds)})")
            return ds[split]
        if split:
            raise ValueError(f"{source} holds a single Dataset without splits; drop --split")
        return ds
    return hf.load_dataset(source, split=split or "train")
