"""A folder tree of images with caption sidecars -> shards.

`a/cat1.jpg` + `a/cat1.txt` (+ optional `a/cat1.json`) become one sample; img2dataset's
`output_format=files` layout (`00000/000000000.jpg` + `.txt` + `.json`) is this layout.
Images are copied byte for byte: re-encoding would cost quality and time for nothing.
Unpaired files are reported, not silently dropped.

A Hugging Face `imagefolder` (images beside a `metadata.jsonl` or `metadata.csv` whose rows
name an image by `file_name`, relative to the metadata file, and give its caption in a
column, `text` by default: what the diffusers training scripts read) is read through its
metadata instead: the caption becomes `txt`, the row's other columns the `json` record.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from data_pipelines.shards import safe_key, samples_per_shard, write_shards

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
IMAGE_FIELDS = set(IMAGE_EXTENSIONS.values())
SIDECAR_EXTENSIONS = {".txt": "txt", ".json": "json"}
# img2dataset's per-shard bookkeeping beside each folder: neither a sample nor worth a warning
BOOKKEEPING = re.compile(r"^\d+(_stats\.json|\.parquet)$")
SHOWN = 5  # names listed per kind of problem


@dataclass
class FolderScan:
    root: Path
    samples: dict[str, dict[str, Path]] = field(default_factory=dict)  # key -> {field: file}
    no_caption: list[str] = field(default_factory=list)  # images without a .txt
    no_image: list[str] = field(default_factory=list)  # sidecars without an image
    other_files: int = 0  # neither images nor sidecars
    caption_from: str = "a .txt caption"
    other_files_are: str = "neither images nor .txt/.json sidecars"

    def problems(self) -> list[str]:
        lines = []
        for names, what in (
            (self.no_caption, f"image(s) without {self.caption_from}"),
            (self.no_image, "sidecar file(s) without an image"),
        ):
            if names:
                more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
                lines.append(f"{self.root}: {len(names)} {what}: {', '.join(names[:SHOWN])}{more}")
        if self.other_files:
            lines.append(f"{self.root}: {self.other_files} other file(s) ignored ({self.other_files_are})")
        return lines


def scan_folder(root: str | os.PathLike, skip: str | os.PathLike | None = None) -> FolderScan:
    """Pair images and sidecars by relative path without extension; `skip` is a folder
    left out (shards written inside the source must not be read back as input)."""
    root = Path(root)
    skip = Path(skip).resolve() if skip else None
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    groups: dict[Path, dict[str, Path]] = {}
    scan = FolderScan(root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if skip and path.resolve().is_relative_to(skip):
            continue
        if BOOKKEEPING.match(path.name):
            continue
        suffix = path.suffix.lower()
        fld = IMAGE_EXTENSIONS.get(suffix) or SIDECAR_EXTENSIONS.get(suffix)
        if fld is None:
            scan.other_files += 1
            continue
        group = groups.setdefault(path.relative_to(root).with_suffix(""), {})
        other = next((p for f, p in group.items() if f in IMAGE_FIELDS), None)
        if fld in IMAGE_FIELDS and other:
            raise ValueError(f"two images for one sample: {other} and {path}")
        group[fld] = path

    stems: dict[str, Path] = {}
    for stem, files in groups.items():
        if not IMAGE_FIELDS & files.keys():
            scan.no_image.extend(str(p.relative_to(root)) for p in files.values())
            continue
        if "txt" not in files:
            scan.no_caption.append(str(stem))
        key = safe_key(stem.as_posix())
        if key in stems:
            raise ValueError(f"'{stems[key]}' and '{stem}' both become sample key '{key}'")
        stems[key] = stem
        scan.samples[key] = files
    return scan


def _read_sample(key: str, files: dict[str, Path]) -> dict:
    sample = {"__key__": key}
    for fld, path in files.items():
        data = path.read_bytes()
        try:
            if fld == "json":
                json.loads(data)
            elif fld != "txt":
                Image.open(io.BytesIO(data))  # header only: is it an image at all?
        except Exception as exc:
            raise ValueError(f"{path}: unreadable {fld} ({type(exc).__name__}: {exc})") from exc
        sample[fld] = data
    return sample


METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def metadata_file(root: str | os.PathLike) -> Path | None:
    """The imagefolder metadata directly under `root`, if there is one."""
    found = [Path(root) / name for name in METADATA_FILES if (Path(root) / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{root}: both {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


def _metadata_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) of a metadata file; `where` names the file and line for errors."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                yield f"{path}:{i}", row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not a JSON object ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: not a JSON object")
            yield f"{path}:{i}", row


def scan_imagefolder(root: str | os.PathLike, metadata: Path, caption_column: str = "text") -> FolderScan:
    """Samples of an imagefolder: key -> {"image": file, "caption": str | None, "extra":
    other columns}. A row naming a missing file, or an image listed twice, is an error;
    images the metadata does not list are counted as other files."""
    root = Path(root)
    scan = FolderScan(
        root, caption_from=f"a '{caption_column}' in {metadata.name}", other_files_are=f"images not in {metadata.name}"
    )
    listed: dict[Path, str] = {}
    for where, row in _metadata_rows(metadata):
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: no 'file_name' (the image's path relative to {metadata.parent})")
        path = metadata.parent / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{where}: file_name '{name}' is not a path inside {metadata.parent}")
        if not path.is_file():
            raise ValueError(f"{where}: file_name '{name}' does not exist ({path})")
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{where}: file_name '{name}' is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        if path in listed:
            raise ValueError(f"{where}: file_name '{name}' is listed again (first at {listed[path]})")
        listed[path] = where
        caption = row.get(caption_column)
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"{where}: column '{caption_column}' of '{name}' is {type(caption).__name__}, not text")
        key = safe_key(Path(name).with_suffix("").as_posix())
        if key in scan.samples:
            raise ValueError(f"{where}: '{name}' and another image both become sample key '{key}'")
        if caption is None:
            scan.no_caption.append(name)
        extra = {k: v for k, v in row.items() if k not in ("file_name", caption_column)}
        scan.samples[key] = {"image": path, "caption": caption, "extra": extra}
    images = {p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    scan.other_files = len(images - set(listed))
    return scan


def _read_listed(key: str, entry: dict) -> dict:
    path = entry["image"]
    data = path.read_bytes()
    try:
        Image.open(io.BytesIO(data))
    except Exception as exc:
        raise ValueError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
    sample = {"__key__": key, IMAGE_EXTENSIONS[path.suffix.lower()]: data}
    if entry["caption"] is not None:
        sample["txt"] = entry["caption"].encode("utf-8")
    if entry["extra"]:
        sample["json"] = json.dumps(entry["extra"]).encode("utf-8")
    return sample


def folder_to_shards(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    require_caption: bool = False,
    caption_column: str = "text",
    maxcount: int = 10_000,
    maxsize: float = 256e6,
    min_shards: int = 0,
) -> dict:
    """Write the image/sidecar pairs under `root`, or the rows of its imagefolder
    metadata (`caption_column` holding the caption), as shards (at least `min_shards` of
    them where there are that many images); returns the manifest.

    Unpaired files are logged as warnings; with `require_caption` an image without a
    caption is an error instead.
    """
    metadata = metadata_file(root)
    if metadata is not None:
        scan = scan_imagefolder(root, metadata, caption_column)
        read = _read_listed
    else:
        scan = scan_folder(root, skip=out_dir)
        read = _read_sample
    if require_caption and scan.no_caption:
        raise ValueError(scan.problems()[0])
    for line in scan.problems():
        log.warning(line)
    if not scan.samples:
        raise ValueError(f"{root}: no images ({', '.join(sorted(set(IMAGE_EXTENSIONS)))}) found")

    def samples() -> Iterator[dict]:
        for key, files in tqdm(scan.samples.items(), desc="samples", unit="sample", disable=None):
            yield read(key, files)

    maxcount = min(maxcount, samples_per_shard(len(scan.samples), 1, min_shards))
    return write_shards(samples(), out_dir, maxcount=maxcount, maxsize=maxsize)
