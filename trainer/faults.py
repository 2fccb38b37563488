"""Failpoints: named places where the fault drills (tests/drills/) make a rank misbehave.

Set `TRIBUTARY_FAILPOINTS` to a comma-separated list of `POINT@STEP[/RANK]=ACTION`:

    save.marker@80/0=pause      rank 0 stops inside the step-80 save, just before COMPLETE.json
    step.end@37/1=kill          rank 1 SIGKILLs itself after optimizer step 37
    step.loss@12/1=nan          rank 1's loss of step 12 becomes NaN (also: inf)

Actions: `pause` writes "POINT STEP RANK" to `TRIBUTARY_FAILPOINT_FLAG` (a file path) and
sleeps until killed, so a drill can SIGKILL the job at a known place; `sleep` writes the
same and goes on after TRIBUTARY_FAILPOINT_SLEEP seconds (3), so a drill can break the disk
under a save in progress; `kill` sends SIGKILL
to the rank itself; `stop` sends SIGSTOP (a hung rank); `nan`/`inf` poison a value. Without
the variable every call is a dictionary lookup on an empty dict.

Points: step.data (before a step's first batch is fetched: a `sleep` there is a slow
reader), step.loss, step.end, and the stages of Checkpointer.save in order: save.start
(empty partial folder), save.files (RNG and data position written), save.model (nothing of
the model and optimizer written yet), save.write (this rank's DCP shard file written, the
index not yet), save.marker (every file written, not yet hashed, no marker), save.rename
(marker written, not yet renamed), save.prune (renamed; older checkpoints not yet pruned).
With trainer.checkpoint_async, save.write to save.prune are reached in the background save's
thread while the loop trains on; a `pause` there stops that thread only.
"""

from __future__ import annotations

import os
import signal
import time

import torch

_POINTS: dict[tuple[str, int], tuple[int | None, str]] = {}


def _parse(spec: str) -> dict:
    points = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            where, action = item.split("=")
            point, at = where.split("@")
            step, _, rank = at.partition("/")
            points[(point, int(step))] = (int(rank) if rank else None, action)
        except ValueError:
            raise ValueError(f"TRIBUTARY_FAILPOINTS: cannot read '{item}' (want POINT@STEP[/RANK]=ACTION)") from None
    return points


_POINTS.update(_parse(os.environ.get("TRIBUTARY_FAILPOINTS", "")))


def _action(point: str, step: int, rank: int) -> str | None:
    if not _POINTS:
        return None
    hit = _POINTS.get((point, step))
    if hit is None or (hit[0] is not None and hit[0] != rank):
        return None
    return hit[1]


def failpoint(point: str, *, step: int, rank: int) -> None:
    action = _action(point, step, rank)
    if action is None:
        return
    if action in ("pause", "sleep"):
        flag = os.environ.get("TRIBUTARY_FAILPOINT_FLAG")
        if flag:
            with open(flag, "a") as f:
                f.write(f"{point} {step} {rank}\n")
        while action == "pause":
            time.sleep(60)
        time.sleep(float(os.environ.get("TRIBUTARY_FAILPOINT_SLEEP", "3")))
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        raise ValueError(f"TRIBUTARY_FAILPOINTS: '{action}' is not an action of {point}")


def poison(point: str, value: torch.Tensor, *, step: int, rank: int) -> torch.Tensor:
    action = _action(point, step, rank)
    if action is None:
        return value
    if action not in ("nan", "inf"):
        raise ValueError(f"TRIBUTARY_FAILPOINTS: {point} takes nan or inf, not '{action}'")
    return value * float(action)
