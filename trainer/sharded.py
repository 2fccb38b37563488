"""Model and optimizer state as torch.distributed.checkpoint (DCP) shards.

Every rank writes the part of the state it holds into `state/__<rank>_0.distcp`: under FSDP2
its own shards; under DDP the replicas are deduplicated and DCP spreads the tensors over the
ranks by size, so the ranks share the writing. Rank 0 adds `state/.metadata`, the index of
every tensor's chunks. A load reads only the chunks that this rank's tensors need, so a
checkpoint written at N ranks loads at M, and one written under DDP loads under FSDP2 and back.
Nothing here gathers a whole model or optimizer state on any rank.

The keys are `model.<fqn>` and `optim.state.<fqn>.<exp_avg|exp_avg_sq|step>` plus the
optimizer's param groups: fully qualified parameter names, the same under every strategy.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer.checkpoint import check_model_shapes
from trainer.faults import failpoint

STATE_DIR = "state"  # inside step-N/
METADATA = ".metadata"
MODEL_PREFIX = "model."
# DCP warns at every save and load in a single process that it assumes a single process
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class _MetadataUnpickler(pickle.Unpickler):
    """DCP reads `.metadata` with plain `pickle.load`, which would run whatever a tampered file
    holds; this one builds only the classes that DCP's index is made of, named exactly (a
    dotted name such as `filesystem` + `os.system` would reach through a module's imports)."""

    _ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{METADATA}: refusing to load {module}.{name} (not part of a "
            "DCP index; the file was altered or is not a DCP checkpoint)"
        )


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner reads the state's non-tensor values (the optimizer's param groups)
    with `torch.load(weights_only=False)`; this one reads them weights-only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class _WeightsOnlyIndexPlanner(_EmptyStateDictLoadPlanner, _WeightsOnlyPlanner):
    """The planner that rebuilds a whole state dict from the index (tools), weights-only."""


def read_metadata(state_dir: Path) -> Metadata:
    path = Path(state_dir) / METADATA
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(io.BytesIO(f.read())).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no DCP index (the checkpoint is incomplete)") from None


class SafeReader(FileSystemReader):
    """DCP's file reader with the restricted index unpickler (DCP reads the tensors weights-only
    itself; the optimizer's other values go through _WeightsOnlyPlanner)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Writer(FileSystemWriter):
    """DCP's file writer (one fsynced file per rank), with the `save.write` failpoint once
    this rank's file is on disk and before rank 0 writes the index."""

    def __init__(self, path: Path, *, step: int, rank: int):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self._step, self._rank = step, rank

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)
        failpoint("save.write", step=self._step, rank=self._rank)
        return written


@contextlib.contextmanager
def _plain_errors(rank: int | None = None):
    """DCP gathers every rank's failure into one CheckpointException, a BaseException: raise the
    underlying error instead (this rank's when it had one), which callers can catch and name."""
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        yield
    except CheckpointException as exc:
        failures = exc.failures
        exc_, _ = failures.get(rank) or next(iter(failures.values()))
        if len(failures) > 1 or rank not in failures:
            exc_.add_note(f"(DCP: failed on rank(s) {sorted(failures)})")
        raise exc_ from None


def state_of(net: torch.nn.Module, optimizer: torch.optim.Optimizer, *, moments: bool | None = None) -> dict:
    """The model and optimizer state as DCP saves and loads it: each rank's own tensors
    (DTensor shards under FSDP2), keyed by parameter name. No copies.

    moments: whether the optimizer's per-parameter state is part of it (default: whether the
    optimizer has any). An optimizer that has not stepped yet (every step so far skipped by
    the fp16 scaler or trainer.nonfinite=skip) has none, and is left without: DCP's helper
    builds it by running a zero-lr step, which would start AdamW's step count one ahead."""
    untouched = not optimizer.state
    moments = not untouched if moments is None else moments
    optim = get_optimizer_state_dict(net, optimizer)
    if not moments:
        if untouched:
            optimizer.state.clear()  # undo the helper's step: the optimizer is as it was
        optim = {"state": {}, "param_groups": optim["param_groups"]}
    return {"model": get_model_state_dict(net), "optim": optim}


class HostStager:
    """A copy of this rank's state in host memory for a background write; its buffers are kept
    from save to save (one host copy of the rank's shard stays allocated), pinned on GPUs.

    Ours because DCP's stager (torch 2.13) copies every DTensor twice, once into a deepcopy
    or a device-to-host copy that it then discards and once into the buffer, and allocates
    its buffers anew at each save: first-touch page faults alone ran at ~2 GB/s here, a copy
    into a kept buffer at ~14 GB/s."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._pin = torch.cuda.is_available()

    def stage(self, state: dict) -> dict:
        staged = self._copy(state, ())
        if self._pin:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return staged

    def _buffer(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self._pin)
            self._buffers[key] = buf
        return buf

    def _copy(self, value: Any, key: tuple) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            local = value.to_local()
            buf = self._buffer(key, local)
            buf.copy_(local, non_blocking=self._pin)
            # the same spec (mesh, placements, global shape) over the host copy, as DCP's own
            # stager builds it; DTensor.from_local would move the copy back to the mesh's device
            return DTensor(buf, value._spec, requires_grad=False)
        if torch.is_tensor(value):
            buf = self._buffer(key, value)
            buf.copy_(value.detach(), non_blocking=self._pin)
            return buf
        if isinstance(value, dict):
            return {k: self._copy(v, key + (k,)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(v, key + (i,)) for i, v in enumerate(value))
        return copy.deepcopy(value)


def writer(
    path: Path,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    rank: int,
    group,
    stager: HostStager | None = None,
) -> Callable[[], list[str]]:
    """Prepare this rank's write of `path/state/`; the callable returned writes it (collective
    over `group`) and names the files this rank wrote, relative to `path`.

    stager: copy the state to host memory now, so the write may run in a background thread
    while the weights move on."""
    state = state_of(net, optimizer)
    out = Path(path) / STATE_DIR
    target = _Writer(out, step=step, rank=rank)
    if stager is not None:
        state = stager.stage(state)

    def write() -> list[str]:
        with _plain_errors(rank):
            # one rank: no collectives at all (a background write must not use the default group)
            dcp.save(state, storage_writer=target, process_group=group, no_dist=group is None)
        return owned_files(path, rank)

    return write


def owned_files(path: Path, rank: int) -> list[str]:
    """The files of `path/state/` that `rank` wrote (its shard files; rank 0 also the index)."""
    out = Path(path) / STATE_DIR
    mine = sorted(f"{STATE_DIR}/{p.name}" for p in out.glob(f"__{rank}_*.distcp"))
    if rank == 0 and (out / METADATA).exists():
        mine.append(f"{STATE_DIR}/{METADATA}")
    return mine


def _model_entries(metadata: Metadata) -> dict[str, Any]:
    return {k[len(MODEL_PREFIX) :]: v for k, v in metadata.state_dict_metadata.items() if k.startswith(MODEL_PREFIX)}


def check_compatible(metadata: Metadata, model_state: dict, where: Path) -> None:
    """The checkpoint's model tensors must be ours, name for name and shape for shape (a dtype
    may differ: DCP converts)."""
    entries = _model_entries(metadata)

    def saved_as(name: str) -> str:
        meta = entries[name]
        if isinstance(meta, TensorStorageMetadata):
            return f"{tuple(meta.size)} {str(meta.properties.dtype).removeprefix('torch.')}"
        return "a non-tensor value"

    check_model_shapes(
        where,
        {n: tuple(t.shape) for n, t in model_state.items()},
        {n: tuple(m.size) if isinstance(m, TensorStorageMetadata) else None for n, m in entries.items()},
        saved_as,
    )


def load(path: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer, *, group) -> None:
    """Read `path/state/` into the model and optimizer, each rank only its own part.
    Collective over `group`."""
    out = Path(path) / STATE_DIR
    metadata = read_metadata(out)
    check_compatible(metadata, get_model_state_dict(net), path)  # before the optimizer is touched
    moments = any(k.startswith("optim.state.") for k in metadata.state_dict_metadata)
    state = state_of(net, optimizer, moments=moments)
    with _plain_errors():
        dcp.load(
            state,
            storage_reader=SafeReader(out),
            planner=_WeightsOnlyPlanner(),
            process_group=group,
            no_dist=group is None,
        )
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, optimizer, state["optim"])


def model_tensors(metadata: Metadata) -> dict[str, TensorStorageMetadata]:
    """name -> (size, dtype) of every model tensor of a DCP index."""
    return {n: m for n, m in _model_entries(metadata).items() if isinstance(m, TensorStorageMetadata)}


def read_model_tensors(state_dir: Path, names: list[str], metadata: Metadata | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors `names` of the model, read in this process alone (no process group):
    only the bytes of those tensors are read. For exports and tools."""
    metadata = metadata or read_metadata(state_dir)
    specs = model_tensors(metadata)
    state = {f"{MODEL_PREFIX}{n}": torch.empty(tuple(specs[n].size), dtype=specs[n].properties.dtype) for n in names}
    with _plain_errors():
        dcp.load(state, storage_reader=SafeReader(state_dir), planner=_WeightsOnlyPlanner(), no_dist=True)
    return {n: state[f"{MODEL_PREFIX}{n}"] for n in names}


def read_all(state_dir: Path) -> dict[str, Any]:
    """Every entry of a (small) DCP checkpoint, flattened, in this process: for tests and tools."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}  # filled from the index, as DCP's dcp_to_torch_save does
    with _plain_errors():
        _load_state_dict(state, storage_reader=SafeReader(state_dir), planner=_WeightsOnlyIndexPlanner(), no_dist=True)
    return flatten_state_dict(state)[0]


def load_full_model(path: Path, net: torch.nn.Module, *, group) -> None:
    """Load Hugging Face-style safetensors (one file or an indexed set) into a model that may be
    sharded: DCP's reader of that format reads each rank's slices only. Collective."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = get_model_state_dict(net)
    with _plain_errors():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path)), process_group=group, no_dist=group is None)
    set_model_state_dict(net, state, options=StateDictOptions(strict=True))
