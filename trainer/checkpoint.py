"""Checkpoints: the explicit list of saved state, written atomically and in parallel by all ranks.

Layout of `<run.dir>/checkpoints/step-<N>/`:
    state/                 model + optimizer (Accelerate DDP/FSDP2): DCP shards, one file per
                           rank (`__<R>_0.distcp`) and rank 0's index `.metadata` (trainer/sharded.py)
    deepspeed/             model + optimizer (DeepSpeed): the engine's own per-rank files
    scheduler.pt           LR scheduler state
    extra.pt               backend extras: the fp16 grad scaler
    trainer_state.json     step, samples seen, training time, best metric, log window
    rng-rank<R>.pt         python / numpy / torch (and CUDA) RNG states of rank R
    data-rank<R>.json      rank R's position in the training stream
    COMPLETE.json          written last: step, world size, and for every file above its
                           xxh3-128 digest, size and the rank that wrote it

A checkpoint is written into `.step-<N>.partial/`, completed by COMPLETE.json and then
renamed; a resume considers only complete folders, and verifies the one it is about to load,
its files split across the ranks. Each rank hashes the files it wrote; with
`trainer.checkpoint_async` the state is staged to host memory and written, hashed, marked and
renamed by a background thread while training goes on. Every file is loaded with
weights-only semantics (no arbitrary pickle; DCP's index and its non-tensor values through
restricted readers, trainer/sharded.py). Checkpoints of the earlier layout
(`model.safetensors` + `optimizer.pt`, sha256 digests) still load.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipelines.digest import file_digest as digest_of_file
from trainer.faults import failpoint

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
FORMAT = 2  # 1: model.safetensors + optimizer.pt written by rank 0, sha256 digests
HASH = "xxh3_128"  # ~24 GB/s on one core here, sha256 ~1.8 (benchmarks/RESULTS.md: checkpoint_scale)
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint holds another model (a key or a shape differs): nothing was loaded."""


def check_model_shapes(
    where: Path, model: dict[str, tuple], saved: dict[str, tuple | None], saved_as: Callable[[str], str]
) -> None:
    """The checkpoint's model tensors must be the model's, name for name and shape for shape (a
    dtype may differ). `saved` maps a name to its shape (None: not a tensor), `saved_as` words a
    saved entry. Raises naming the first difference and both sides."""
    for name, shape in model.items():
        if name not in saved:
            raise IncompatibleCheckpointError(
                f"{where}: the model has '{name}' {shape}, the checkpoint has no such tensor (it holds "
                f"{len(saved)} model tensors, e.g. {sorted(saved)[:3]}); it was written for another model"
            )
        if saved[name] != shape:
            raise IncompatibleCheckpointError(
                f"{where}: '{name}' is {shape} in the model but {saved_as(name)} in the checkpoint; it "
                "was written for another model shape (resume with the model config it was trained "
                "with, or start a new run.dir)"
            )
    extra = sorted(set(saved) - set(model))
    if extra:
        raise IncompatibleCheckpointError(
            f"{where}: the checkpoint has '{extra[0]}' {saved_as(extra[0])}, which the model lacks "
            f"({len(extra)} such tensor(s)); it was written for another model"
        )


MODEL_RECORD, CONFIG_RECORD = "model.json", "config.yaml"  # rank 0 adds them to every checkpoint


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def model_changes(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(dotted model.* key, the checkpoint's value, this recipe's) for every key that differs."""
    a, b = _flat(saved, "model"), _flat(now, "model")
    missing = "(not set)"
    return [
        (k, a.get(k, missing), b.get(k, missing))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


def check_resume_model(path: Path, shapes: dict[str, list], model_cfg: dict) -> list[str]:
    """Before anything is loaded: refuse a checkpoint written for another model, naming the
    model.* keys that differ with both values (or, when none does, the first tensor: the model's
    code changed). Returns the model.* changes that leave every name and shape alone, in words.
    A checkpoint from before checkpoints carried these records is left to the load's checks."""
    import yaml

    if not (path / MODEL_RECORD).is_file():
        return []
    saved_shapes = json.loads((path / MODEL_RECORD).read_text())["shapes"]
    changes = []
    if (path / CONFIG_RECORD).is_file():
        changes = model_changes(yaml.safe_load((path / CONFIG_RECORD).read_text())["model"], model_cfg)
    if saved_shapes == shapes:
        return [f"{k}: {a} -> {b}" for k, a, b in changes]
    fix = "use a new run.dir, or trainer.resume=never to start this run dir afresh"
    if changes:
        said = "; ".join(f"{k}: the checkpoint has {a}, this recipe {b}" for k, a, b in changes[:6])
        more = f" (+{len(changes) - 6} more)" if len(changes) > 6 else ""
        raise IncompatibleCheckpointError(
            f"{path} was written for another model, and nothing was loaded: {said}{more}; {fix}"
        )
    name = next(n for n in sorted(shapes.keys() | saved_shapes.keys()) if shapes.get(n) != saved_shapes.get(n))
    raise IncompatibleCheckpointError(
        f"{path} was written for another model, and nothing was loaded: its model.* config is this "
        f"recipe's, but '{name}' is {saved_shapes.get(name, 'absent')} in the checkpoint and "
        f"{shapes.get(name, 'absent')} in this model (the model's code changed?); {fix}"
    )


def rng_state() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "keys": torch.from_numpy(npy[1].astype(np.int64)),
            "pos": int(npy[2]),
            "has_gauss": int(npy[3]),
            "cached_gaussian": float(npy[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
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


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- integrity
def file_digest(path: Path, algo: str = HASH) -> str:
    """xxh3-128 for checkpoints of this format; sha256 for the earlier one."""
    return digest_of_file(path, algo)


def read_marker(path: Path) -> tuple[dict | None, str | None]:
    """(marker, None) or (None, why not): the marker's files as {name: {digest, bytes, rank}}
    whatever the format, plus the algorithm under "hash"."""
    marker = path / MARKER
    if not marker.exists():
        return None, f"{path}: no {MARKER} (half-written)"
    try:
        meta = json.loads(marker.read_text())
        files = dict(meta["files"])
        if meta.get("format", 1) == 1:  # name -> sha256 hex
            meta["hash"] = "sha256"
            meta["files"] = {n: {"digest": d, "bytes": None, "rank": 0} for n, d in files.items()}
        else:
            meta["files"] = {
                n: {"digest": e["digest"], "bytes": int(e["bytes"]), "rank": int(e["rank"])} for n, e in files.items()
            }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{path}: unreadable {MARKER} ({type(exc).__name__}: {exc})"
    return meta, None


def _check_file(path: Path, name: str, entry: dict, algo: str) -> str | None:
    f = path / name
    try:
        size = f.stat().st_size
        if entry["bytes"] is not None and size != entry["bytes"]:
            return f"{path}: {name} is {size} bytes, {entry['bytes']} were written (written by rank {entry['rank']})"
        if file_digest(f, algo) != entry["digest"]:
            return f"{path}: {name} does not match its checksum (written by rank {entry['rank']})"
    except FileNotFoundError:
        return f"{path}: {name} is missing"
    except OSError as exc:  # unreadable: a verdict like any other, so the ranks still vote
        return f"{path}: {name} cannot be read ({exc.strerror or exc})"
    return None


def share_of(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """The files that `rank` verifies: largest first, each to the least-loaded rank, so every
    byte is read once and the ranks read about as much. The same on every rank."""
    loads = [(0, r) for r in range(world_size)]
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, r = heapq.heappop(loads)
        if r == rank:
            mine.append(name)
        heapq.heappush(loads, (load + sizes[name], r))
    return mine


def _sizes(path: Path, meta: dict) -> dict[str, int]:
    out = {}
    for name, entry in meta["files"].items():
        if entry["bytes"] is None:  # the earlier format did not record sizes
            try:
                entry = dict(entry, bytes=(path / name).stat().st_size)
            except OSError:
                entry = dict(entry, bytes=0)
        out[name] = entry["bytes"]
    return out


def verify(path: Path) -> str | None:
    """None if `path` is a complete checkpoint whose files match their digests; every file is
    read here, by this process (tools and tests; a resume splits the work across ranks)."""
    meta, problem = read_marker(path)
    if problem:
        return problem
    for name, entry in meta["files"].items():
        problem = _check_file(path, name, entry, meta["hash"])
        if problem:
            return problem
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    """Folders step-N under root that have their marker, oldest first; warns about the others."""
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


def newest_complete(root: Path) -> Path | None:
    """The newest checkpoint with its marker, not re-hashed (for messages)."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint whose digests hold, checked by this process alone;
    older ones are fallbacks."""
    for p in reversed(complete_checkpoints(root)):
        problem = verify(p)
        if problem is None:
            return p
        log.warning("skipping damaged checkpoint: %s", problem)
    return None


def checkpoint_group(world_size: int, timeout_s: float):
    """A gloo group of the checkpointer's own: its collectives (failure votes, digests, DCP's
    plans) run on CPU tensors, and a background save never interleaves them with training's.
    Its timeout (trainer.checkpoint_timeout_s) bounds how long a rank waits for the slowest
    rank's write, which for a large shard on slow storage is minutes."""
    if world_size == 1 or not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


class _Pending:
    """A save whose write, digests, marker and rename run in a background thread."""

    def __init__(self, step: int, run: Callable[[], None]):
        self.step, self.error = step, None

        def body():
            try:
                run()
            except BaseException as exc:  # noqa: BLE001 - re-raised by Checkpointer.wait
                self.error = exc

        self.thread = threading.Thread(target=body, name=f"checkpoint-step-{step}", daemon=True)
        self.thread.start()


class Checkpointer:
    """Collective save/load of the listed state; every rank must call save, wait and load.

    background: `save` returns once the state is staged in host memory; the rest of the save
    runs in a thread, and the next `save` (or `wait`) waits for it first.
    """

    def __init__(self, root: Path, backend, keep_last_k: int, *, background: bool = False, timeout_s: float = 600):
        self.root, self.backend, self.keep_last_k = root, backend, keep_last_k
        self.background = background
        self.group = checkpoint_group(backend.world_size, timeout_s)
        self._pending: _Pending | None = None
        self._finished: list[dict] = []  # {step, blocked_s, save_s} of completed saves
        self._finished_lock = threading.Lock()  # appended by a background save's thread

    # ------------------------------------------------ collectives on the checkpointer's group
    def _sum(self, value: float) -> float:
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.item()

    def _broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _gather(self, obj: Any) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if self.group is None:
            return [obj]
        out = [None] * self.backend.world_size if self.backend.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    # ------------------------------------------------ save
    def save(
        self,
        step: int,
        *,
        model,
        optimizer,
        scheduler,
        trainer_state: dict,
        data_state: dict,
        records: dict[str, str] | None = None,
    ) -> Path:
        """Write step-N; on any rank's failure (a full disk, an unwritable folder) every rank
        raises CheckpointError, the partial folder is removed and older checkpoints stay.
        In the background mode a failure of the write is raised by the next save or wait.
        `records`: text files rank 0 adds (the resolved config, the model's tensor shapes)."""
        self.wait()
        b = self.backend
        started = time.perf_counter()
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.partial"
        own = [f"rng-rank{b.rank}.pt", f"data-rank{b.rank}.json"]
        records = records or {}
        if b.is_main:
            own += ["scheduler.pt", "extra.pt", "trainer_state.json", *records]
        write: list[Callable[[], list[str]]] = []

        def start():
            if b.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def rank_files():
            torch.save(rng_state(), tmp / f"rng-rank{b.rank}.pt")
            write_json(tmp / f"data-rank{b.rank}.json", data_state)

        def model_files():
            write.append(b.checkpoint_writer(tmp, model, optimizer, step=step, group=self.group, stage=self.background))
            if b.is_main:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(b.extra_state(), tmp / "extra.pt")
                write_json(tmp / "trainer_state.json", trainer_state)
                for name, text in records.items():
                    (tmp / name).write_text(text, encoding="utf-8")

        self._phase("save.start", step, tmp, start)
        self._phase("save.files", step, tmp, rank_files)
        self._phase("save.model", step, tmp, model_files)  # sync: nothing of the model written yet
        if self.background:
            blocked = time.perf_counter() - started
            self._pending = _Pending(step, lambda: self._complete(step, tmp, final, write[0], own, started, blocked))
        else:
            self._complete(step, tmp, final, write[0], own, started, None)
        return final

    def _complete(
        self,
        step: int,
        tmp: Path,
        final: Path,
        write: Callable[[], list[str]],
        own: list[str],
        started: float,
        blocked: float | None,
    ) -> None:
        """Model and optimizer files, digests, marker, rename, prune: on the caller's thread, or
        on the background save's (the checkpointer's group keeps its collectives apart)."""
        b = self.backend
        digests: dict[str, dict] = {}
        self._phase(None, step, tmp, lambda: own.extend(write()))  # DCP agrees on its failures
        # every rank's files are on disk now; each rank hashes its own, all at once
        self._phase(
            "save.marker",
            step,
            tmp,
            lambda: digests.update(
                {
                    name: {"digest": file_digest(tmp / name), "bytes": (tmp / name).stat().st_size, "rank": b.rank}
                    for name in own
                }
            ),
        )
        every = self._gather(digests)
        self._phase(None, step, tmp, lambda: self._write_marker(tmp, step, every))

        def rename():
            if not b.is_main:
                return
            if final.exists():  # a stale copy of this step, e.g. from a resumed run
                self._discard(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)

        self._phase("save.rename", step, tmp, rename)
        failpoint("save.prune", step=step, rank=b.rank)
        if b.is_main:
            try:
                self.prune()
            except OSError as exc:  # the new checkpoint is complete; an old one stays a while
                log.warning("could not prune old checkpoints under %s: %s", self.root, exc)
        self._sum(0.0)  # a barrier: every rank returns with the checkpoint in place
        total = time.perf_counter() - started
        with self._finished_lock:
            self._finished.append({"step": step, "blocked_s": total if blocked is None else blocked, "save_s": total})

    def take_finished(self) -> list[dict]:
        """{step, blocked_s, save_s} of the saves completed since the last call, for the log:
        how long each blocked the loop and how long it took in all."""
        with self._finished_lock:
            done, self._finished = self._finished, []
        return done

    def _write_marker(self, tmp: Path, step: int, every: list | None) -> None:
        b = self.backend
        if not b.is_main:
            return
        files = {}
        for part in every:
            files.update(part)
        expected = {f"rng-rank{r}.pt" for r in range(b.world_size)}
        if not expected <= files.keys():
            raise CheckpointError(f"{tmp}: missing rank files {sorted(expected - files.keys())}")
        write_json(
            tmp / MARKER,
            {
                "format": FORMAT,
                "step": step,
                "world_size": b.world_size,
                "layout": b.checkpoint_layout,
                "time": time.time(),
                "hash": HASH,
                "files": dict(sorted(files.items())),
            },
        )
        _fsync_dir(tmp)

    def wait(self) -> None:
        """Until the background save in flight (if any) is complete; raises its error."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.thread.join()
        if pending.error is not None:
            raise pending.error

    def _phase(self, point: str | None, step: int, tmp: Path, work) -> None:
        error = None
        try:
            if point:
                failpoint(point, step=step, rank=self.backend.rank)
            work()
        except Exception as exc:  # torch.save reports ENOSPC as a RuntimeError
            error = exc
        self._agree(error, step, tmp)  # also the barrier between phases

    def _agree(self, error: BaseException | None, step: int, tmp: Path) -> None:
        """A barrier that fails on every rank when any rank failed, so none waits forever."""
        b = self.backend
        if self._sum(float(error is not None)) == 0:
            return
        if b.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        keep = newest_complete(self.root) if b.is_main else None
        why = f"{type(error).__name__}: {error}" if error is not None else "another rank failed"
        try:  # torch.save reports a full disk as "unexpected pos N vs M", without the errno
            free = f"; {shutil.disk_usage(self.root).free / 1e6:.1f} MB free on its disk"
        except OSError:
            free = ""
        kept = f"the last complete checkpoint, {keep}, is intact" if keep else "no earlier checkpoint exists"
        raise CheckpointError(
            f"checkpoint step-{step} could not be written under {self.root} "
            f"(rank {b.rank}: {why}{free}); {kept}; nothing was renamed into place"
        )

    @staticmethod
    def _discard(path: Path) -> None:
        """Rename out of the step-N namespace first, so a kill mid-delete leaves no half
        checkpoint under a name that a resume would consider."""
        doomed = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def prune(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep_last_k]:
            self._discard(old)
        # left by a run killed mid-prune or mid-save; no other save is in flight now
        for leftover in [*self.root.glob(".step-*.deleting"), *self.root.glob(".step-*.partial")]:
            shutil.rmtree(leftover, ignore_errors=True)

    # ------------------------------------------------ resume
    def verify_shared(self, path: Path) -> str | None:
        """`verify` with the files split across the ranks (each byte read once); the ranks
        agree on the verdict. None if sound, else the first problem found (every rank)."""
        b = self.backend
        meta, problem = read_marker(path)
        if meta is not None:
            for name in share_of(_sizes(path, meta), b.rank, b.world_size):
                problem = _check_file(path, name, meta["files"][name], meta["hash"])
                if problem:
                    break
        if self._sum(float(problem is not None)) == 0:
            return None
        found = self._gather(problem)
        return self._broadcast(next(p for p in found if p) if b.is_main else None)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from, verified by all ranks together (collective)."""
        if resume == "never":
            return None
        if resume != "auto":
            problem = self.verify_shared(Path(resume))
            if problem:
                raise CheckpointError(f"trainer.resume: {problem}")
            return Path(resume)
        found = [str(p) for p in reversed(complete_checkpoints(self.root))] if self.backend.is_main else None
        for candidate in self._broadcast(found):
            problem = self.verify_shared(Path(candidate))
            if problem is None:
                return Path(candidate)
            if self.backend.is_main:
                log.warning("skipping damaged checkpoint: %s", problem)
        return None

    def load(self, path: Path, *, model, optimizer, scheduler) -> tuple[dict, list[dict]]:
        """Restore model, optimizer, scheduler and extras.

        Returns (trainer_state, data states of every rank that wrote the checkpoint): the
        data stream decides whether it resumes exactly or deals the rest to a new layout.
        RNG states are restored by `restore_rng`, last, once everything is built.
        """
        b = self.backend
        meta = json.loads((path / MARKER).read_text())
        b.load_model_and_optimizer(path, model, optimizer, group=self.group)
        scheduler.load_state_dict(load_weights_only(path / "scheduler.pt"))
        b.load_extra_state(load_weights_only(path / "extra.pt"))
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        data_states = [json.loads((path / f"data-rank{r}.json").read_text()) for r in range(meta["world_size"])]
        return trainer_state, data_states

    def restore_rng(self, path: Path) -> bool:
        """Restore this rank's RNG; False when the checkpoint had no such rank (elastic)."""
        f = path / f"rng-rank{self.backend.rank}.pt"
        if not f.exists():
            return False
        set_rng_state(load_weights_only(f))
        return True
