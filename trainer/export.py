"""Consolidated weights as Hugging Face-style safetensors, written and read tensor by tensor.

An export is `model.safetensors`, or, past `max_shard_size`, `model-00001-of-0000K.safetensors`
... plus `model.safetensors.index.json` (the weight map that transformers, diffusers,
accelerate's `load_checkpoint_in_model` and DCP's HuggingFaceStorageReader read). The writer
holds at most one shard in memory, so a model larger than one host's memory exports shard by
shard: from a live model (the `best/` export), from DCP checkpoints and from DeepSpeed ones.
Ours because huggingface_hub's splitter plans from a whole state dict and writes nothing: here
tensors arrive one at a time (gathered, or read from shards) and leave as soon as a shard fills.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# renames a tensor, or turns it into several or none (an export to another library's layout)
Convert = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int, *, key: str = "max_shard_size") -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20 (Hugging Face's units: GB is 10^9)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{key}: cannot read '{text}' as a size (e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def shard_groups(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Tensors in order, cut into consecutive groups of at most max_shard_size bytes (a larger
    tensor gets a shard of its own), as the writer cuts them."""
    groups: list[list[str]] = [[]]
    held = 0
    for name, size in sizes.items():
        if groups[-1] and held + size > max_shard_size:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += size
    return [g for g in groups if g]


class SafetensorsShards:
    """Tensors in, shards out: each shard is written as soon as the next tensor would overflow
    it (or at `flush`); `close` names the files -of-K and writes the index (one shard: a plain
    model.safetensors, no index)."""

    def __init__(self, out: Path, max_shard_size: int | str):
        self.out, self.max = Path(out), parse_size(max_shard_size)
        self.out.mkdir(parents=True, exist_ok=True)
        self.buffer: dict[str, torch.Tensor] = {}
        self.held = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add_converted(self, name: str, tensor: torch.Tensor, convert: Convert | None) -> None:
        for new_name, new_tensor in [(name, tensor)] if convert is None else convert(name, tensor):
            self.add(new_name, new_tensor)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.held + size > self.max:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.held += size
        self.total += size

    def flush(self) -> None:
        if not self.buffer:
            return
        save_file(self.buffer, str(self.out / f".shard-{len(self.shards)}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.held = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        k = len(self.shards)
        if k <= 1:
            names = [SINGLE]
        else:
            names = [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        for i, name in enumerate(names[:k]):
            os.replace(self.out / f".shard-{i}.safetensors", self.out / name)
        if k > 1:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": {t: names[i] for i, keys in enumerate(self.shards) for t in keys},
            }
            (self.out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        elif k == 0:  # a model without tensors still gets a (valid, empty) file
            save_file({}, str(self.out / SINGLE), metadata={"format": "pt"})
        return [self.out / n for n in names]


def exported_files(path: Path) -> dict[str, Path]:
    """name -> file of every tensor of an export folder (indexed shards, or model.safetensors)."""
    path = Path(path)
    if (path / INDEX).exists():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return {name: path / f for name, f in weight_map.items()}
    if (path / SINGLE).exists():
        with safe_open(str(path / SINGLE), framework="pt") as f:
            return {name: path / SINGLE for name in f.keys()}
    raise FileNotFoundError(f"{path}: no {SINGLE} and no {INDEX}")


def iter_exported(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an export, one file open at a time."""
    by_file: dict[Path, list[str]] = {}
    for name, f in exported_files(path).items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as handle:
            for name in names:
                yield name, handle.get_tensor(name)


def shapes_in(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a safetensors file or export folder, from the headers alone."""
    path = Path(path)
    files = [path] if path.is_file() else dict.fromkeys(exported_files(path).values())
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                out[name] = tuple(handle.get_slice(name).get_shape())
    return out


def check_shapes(saved: Path, model: torch.nn.Module, where: Path | None = None) -> None:
    """A whole-model safetensors file (or export) must match the model name for name and shape."""
    from trainer.checkpoint import check_model_shapes

    theirs = shapes_in(saved)
    check_model_shapes(
        where or saved,
        {n: tuple(t.shape) for n, t in model.state_dict().items()},
        theirs,
        lambda name: str(theirs[name]),
    )


# ---------------------------------------------------------------- from checkpoints
def export_dcp(state_dir: Path, out: Path, max_shard_size: int | str, convert: Convert | None = None) -> list[Path]:
    """A DCP checkpoint's model tensors -> safetensors, one shard's tensors read at a time."""
    from trainer import sharded

    metadata = sharded.read_metadata(state_dir)
    specs = sharded.model_tensors(metadata)
    sizes = {n: nbytes(m.size, m.properties.dtype) for n, m in specs.items()}
    writer = SafetensorsShards(out, max_shard_size)
    for group in shard_groups(sizes, writer.max):
        tensors = sharded.read_model_tensors(state_dir, group, metadata)
        for name in group:  # popped: a converted copy does not keep its source alive
            writer.add_converted(name, tensors.pop(name), convert)
        writer.flush()
    return writer.close()


def export_deepspeed(
    checkpoint: Path, out: Path, max_shard_size: int | str, convert: Convert | None = None
) -> list[Path]:
    """DeepSpeed's ZeRO partitions -> fp32 safetensors: DeepSpeed's own reader joins each tensor
    (its lazy mode; ZeRO-3: one tensor at a time from the partitions; ZeRO-1/2: it joins the flat
    fp32 partitions first, one fp32 copy of the model), our writer cuts the shards. Ours because
    DeepSpeed's writer refuses tied weights (one tensor under two names)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.backends.deepspeed import DS_TAG, weights_only_torch_load

    if not (checkpoint / DS_TAG).is_dir():
        raise FileNotFoundError(f"{checkpoint}: no DeepSpeed engine checkpoint ({DS_TAG}/)")
    with weights_only_torch_load():
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG, lazy_mode=True)
    writer = SafetensorsShards(out, max_shard_size)
    for name in list(lazy):
        tensor = lazy.pop(name).contiguous()
        # a copy of its own: ZeRO-1/2's tensors are views into one flat vector, and a file's
        # tensors may not share storage
        tensor = tensor.to(torch.float32, copy=True) if tensor.is_floating_point() else tensor.clone()
        writer.add_converted(name, tensor, convert)
    return writer.close()


def export_files(src: Path, out: Path, max_shard_size: int | str, convert: Convert | None = None) -> list[Path]:
    """A safetensors export or an earlier-layout checkpoint's model.safetensors, re-cut."""
    writer = SafetensorsShards(out, max_shard_size)
    for name, tensor in iter_exported(src):
        writer.add_converted(name, tensor, convert)
    return writer.close()


def export_checkpoint(
    src: Path, out: Path, max_shard_size: int | str = "5GB", convert: Convert | None = None
) -> list[Path]:
    """Any of the trainer's checkpoint layouts, or a best/ export, as safetensors in `out`;
    each tensor passes through `convert` on its way, if given."""
    from trainer import sharded
    from trainer.backends.deepspeed import DS_TAG

    src = Path(src)
    for stale in [*Path(out).glob("model*.safetensors"), Path(out) / INDEX]:
        stale.unlink(missing_ok=True)
    if (src / sharded.STATE_DIR).is_dir():
        return export_dcp(src / sharded.STATE_DIR, out, max_shard_size, convert)
    if (src / DS_TAG).is_dir():
        return export_deepspeed(src, out, max_shard_size, convert)
    return export_files(src, out, max_shard_size, convert)
