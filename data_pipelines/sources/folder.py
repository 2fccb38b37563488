"""A folder tree of images with caption sidecars -> shards.

`a/cat1.jpg` + `a/cat1.txt` (+ optional `a/cat1.json`) become one sample; img2dataset's
`output_format=files` layout (`00000/000000000.jpg` + `.txt` + `.json`) is this layout.
Images are copied byte for byte: re-encoding would cost quality and time for nothing.
Unpaired files are reported, not silently dropped.
"""

from __future__ import annotations

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

    def problems(self) -> list[str]:
        lines = []
        for names, what in (
            (self.no_caption, "image(s) without a .txt caption"),
            (self.no_image, "sidecar file(s) without an image"),
        ):
            if names:
                more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
                lines.append(f"{self.root}: {len(names)} {what}: {', '.join(names[:SHOWN])}{more}")
        if self.other_files:
            lines.append(
                f"{self.root}: {self.other_files} other file(s) ignored (neither images nor .txt/.json sidecars)"
            )
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


def folder_to_shards(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    require_caption: bool = False,
    maxcount: int = 10_000,
    maxsize: float = 256e6,
    min_shards: int = 0,
) -> dict:
    """Write the image/sidecar pairs under `root` as shards (at least `min_shards` of
    them where there are that many images); returns the manifest.

    Unpaired files are logged as warnings; with `require_caption` an image without a
    caption is an error instead.
    """
    scan = scan_folder(root, skip=out_dir)
    if require_caption and scan.no_caption:
        raise ValueError(scan.problems()[0])
    for line in scan.problems():
        log.warning(line)
    if not scan.samples:
        raise ValueError(f"{root}: no images ({', '.join(sorted(set(IMAGE_EXTENSIONS)))}) found")

    def samples() -> Iterator[dict]:
        for key, files in tqdm(scan.samples.items(), desc="samples", unit="sample", disable=None):
            yield _read_sample(key, files)

    maxcount = min(maxcount, samples_per_shard(len(scan.samples), 1, min_shards))
    return write_shards(samples(), out_dir, maxcount=maxcount, maxsize=maxsize)
