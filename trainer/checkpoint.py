"""Checkpoints: the explicit list of saved state, written atomically by all ranks.

Layout of `<run.dir>/checkpoints/step-<N>/`:
    model.safetensors      weights (backend-written)
    optimizer.pt           optimizer state (backend-written; tensors and numbers only)
    scheduler.pt           LR scheduler state
    extra.pt               backend extras: the fp16 grad scaler
    trainer_state.json     step, samples seen, training time, best metric, log window
    rng-rank<R>.pt         python / numpy / torch (and CUDA) RNG states of rank R
    data-rank<R>.json      rank R's position in the training stream
    COMPLETE.json          written last: step, world size, sha256 of every file above

A checkpoint is written into `.step-<N>.partial/`, completed by COMPLETE.json and then
renamed; `latest` considers only complete folders whose checksums hold. Every file is
loaded with weights-only semantics (no arbitrary pickle).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from data_pipelines.shards import sha256_file
from trainer.faults import failpoint

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(npy[1].astype(np.int64)), "pos": int(npy[2]),
                  "has_gauss": int(npy[3]), "cached_gaussian": float(npy[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_weights_only(path: Path, device: Any = "cpu") -> Any:
    return torch.load(path, map_location=device, weights_only=True)


def step_of(path: Path) -> Optional[int]:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def verify(path: Path) -> Optional[str]:
    """None if `path` is a complete checkpoint whose files match their checksums."""
    marker = path / MARKER
    if not marker.exists():
        return f"{path}: no {MARKER} (half-written)"
    try:
        meta = json.loads(marker.read_text())
        files = dict(meta["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path}: unreadable {MARKER} ({type(exc).__name__}: {exc})"
    for name, digest in files.items():
        f = path / name
        if not f.exists():
            return f"{path}: {name} is missing"
        if sha256_file(f) != digest:
            return f"{path}: {name} does not match its checksum"
    return None


def complete_checkpoints(root: Path, *, check: bool = False) -> list[Path]:
    """Complete step-N folders under root, oldest first; warns about the others."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith(".step-") and p.name.endswith(".partial"):
            log.warning("ignoring unfinished checkpoint %s", p)
            continue
        if p.name.startswith(".step-") and p.name.endswith(".deleting"):
            continue  # being pruned
        if step_of(p) is None or not p.is_dir():
            continue
        if not (p / MARKER).exists():
            log.warning("ignoring checkpoint without %s (half-written): %s", MARKER, p)
            continue
        found.append(p)
    return sorted(found, key=step_of)


def latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint whose checksums hold; older ones are fallbacks."""
    for p in reversed(complete_checkpoints(root)):
        problem = verify(p)
        if problem is None:
            return p
        log.warning("skipping damaged checkpoint: %s", problem)
    return None


class Checkpointer:
    """Collective save/load of the listed state; every rank must call save and load."""

    def __init__(self, root: Path, backend, keep_last_k: int):
        self.root, self.backend, self.keep_last_k = root, backend, keep_last_k

    def save(self, step: int, *, model, optimizer, scheduler, trainer_state: dict,
             data_state: dict) -> Path:
        """Write step-N; on any rank's failure (a full disk, an unwritable folder) every rank
        raises CheckpointError, the partial folder is removed and older checkpoints stay."""
        b = self.backend
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.partial"

        def phase(point: str, work) -> None:
            error = None
            try:
                failpoint(point, step=step, rank=b.rank)
                work()
            except Exception as exc:  # torch.save reports ENOSPC as a RuntimeError
                error = exc
            self._agree(error, step, tmp)  # also the barrier between phases

        def start():
            if b.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def rank_files():
            torch.save(rng_state(), tmp / f"rng-rank{b.rank}.pt")
            write_json(tmp / f"data-rank{b.rank}.json", data_state)

        def model_files():
            b.save_model_and_optimizer(tmp, model, optimizer)
            if b.is_main:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(b.extra_state(), tmp / "extra.pt")
                write_json(tmp / "trainer_state.json", trainer_state)

        def marker():
            if not b.is_main:
                return
            files = {p.relative_to(tmp).as_posix(): sha256_file(p)
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            expected = {f"rng-rank{r}.pt" for r in range(b.world_size)}
            if not expected <= files.keys():
                raise CheckpointError(f"{tmp}: missing rank files {sorted(expected - files.keys())}")
            write_json(tmp / MARKER, {"step": step, "world_size": b.world_size,
                                      "time": time.time(), "files": files})
            _fsync_dir(tmp)

        def rename():
            if not b.is_main:
                return
            if final.exists():  # a stale copy of this step, e.g. from a resumed run
                self._discard(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)

        phase("save.start", start)
        phase("save.files", rank_files)
        phase("save.model", model_files)  # every rank's files are on disk after this
        phase("save.marker", marker)
        phase("save.rename", rename)
        failpoint("save.prune", step=step, rank=b.rank)
        if b.is_main:
            self.prune()
        b.barrier()
        return final

    def _agree(self, error: Optional[BaseException], step: int, tmp: Path) -> None:
        """A barrier that fails on every rank when any rank failed, so none waits forever."""
        b = self.backend
        failed = error is not None
        if b.world_size > 1:
            flag = torch.tensor(float(failed), device=b.device)
            failed = b.reduce_sum(flag).item() > 0
        if not failed:
            return
        if b.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        keep = latest(self.root) if b.is_main else None
        why = f"{type(error).__name__}: {error}" if error is not None else "another rank failed"
        try:  # torch.save reports a full disk as "unexpected pos N vs M", without the errno
            free = f"; {shutil.disk_usage(self.root).free / 1e6:.1f} MB free on its disk"
        except OSError:
            free = ""
        kept = f"the last complete checkpoint, {keep}, is intact" if keep else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint step-{step} could not be written under {self.root} "
                              f"(rank {b.rank}: {why}{free}); {kept}; nothing was renamed into place")

    @staticmethod
    def _discard(path: Path) -> None:
        """Rename out of the step-N namespace first, so a kill mid-delete leaves no half
        checkpoint under a name that `latest` would consider."""
        doomed = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def prune(self) -> None:
        for old in complete_checkpoints(self.root)[:-self.keep_last_k]:
            self._discard(old)
        # left by a run killed mid-prune or mid-save; no other save is in flight now
        for leftover in [*self.root.glob(".step-*.deleting"), *self.root.glob(".step-*.partial")]:
            shutil.rmtree(leftover, ignore_errors=True)

    def resolve(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from (chosen on rank 0, agreed by all)."""
        choice = None
        if self.backend.is_main and resume != "never":
            if resume == "auto":
                choice = latest(self.root)
            else:
                problem = verify(Path(resume))
                if problem:
                    choice = CheckpointError(f"trainer.resume: {problem}")
                else:
                    choice = Path(resume)
        choice = self.backend.broadcast_object(str(choice) if isinstance(choice, Path) else choice)
        if isinstance(choice, CheckpointError):
            raise choice
        return Path(choice) if choice else None

    def load(self, path: Path, *, model, optimizer, scheduler) -> tuple[dict, list[dict]]:
        """Restore model, optimizer, scheduler and extras.

        Returns (trainer_state, data states of every rank that wrote the checkpoint): the
        data stream decides whether it resumes exactly or deals the rest to a new layout.
        RNG states are restored by `restore_rng`, last, once everything is built.
        """
        b = self.backend
        meta = json.loads((path / MARKER).read_text())
        b.load_model_and_optimizer(path, model, optimizer)
        scheduler.load_state_dict(load_weights_only(path / "scheduler.pt"))
        b.load_extra_state(load_weights_only(path / "extra.pt"))
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        data_states = [json.loads((path / f"data-rank{r}.json").read_text())
                       for r in range(meta["world_size"])]
        return trainer_state, data_states

    def restore_rng(self, path: Path) -> bool:
        """Restore this rank's RNG; False when the checkpoint had no such rank (elastic)."""
        f = path / f"rng-rank{self.backend.rank}.pt"
        if not f.exists():
            return False
        set_rng_state(load_weights_only(f))
        return True
