"""Fault drills: kill, crash, poison and starve 2-rank runs; nothing may be lost.

Every drill ends by comparing with the uninterrupted 2-rank run of the same recipe
(`smoke_reference`): the same loss, LR and grad norm at every step, bit for bit, and the
same final metrics. Strength: TRIBUTARY_DRILL_TRIALS (1 in `make test`, 10 in `make
drills`). Random choices come from TRIBUTARY_DRILL_SEED (default: the clock), reported
with the results in TRIBUTARY_DRILL_REPORT (a JSON-lines file) when that is set.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_tree, wait_for
from launching import (
    RECIPE,
    ROOT,
    STEPS,
    accelerate_cmd,
    assert_matches_reference,
    last_step,
    run_ok,
    smoke_overrides,
    train_records,
)

from trainer.checkpoint import MARKER, complete_checkpoints, latest, verify
from trainer.metrics import read_jsonl
from trainer.sharded import read_all

TRIALS = int(os.environ.get("TRIBUTARY_DRILL_TRIALS", "1"))
EVERY = 40  # smoke_overrides' checkpoint interval
SAVE_STAGES = ["save.start", "save.files", "save.model", "save.write", "save.marker", "save.rename", "save.prune"]
# with trainer.checkpoint_async these run in the background thread while the loop trains on
BACKGROUND_STAGES = ["save.write", "save.marker", "save.rename", "save.prune"]


def seeded(name: str) -> random.Random:
    seed = int(os.environ.get("TRIBUTARY_DRILL_SEED", time.time_ns() % 1_000_000))
    print(f"{name}: TRIBUTARY_DRILL_SEED={seed}")
    rng = random.Random(seed)
    rng.seed_value = seed
    return rng


def report(drill: str, **tally) -> None:
    line = json.dumps({"drill": drill, **tally})
    print(line)
    path = os.environ.get("TRIBUTARY_DRILL_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")


class Chain:
    """One run directory, killed and resumed again and again, checked after every launch."""

    def __init__(self, tmp: Path, digits_dir, env, reference, *more):
        self.tmp, self.env, self.reference = tmp, env, reference
        self.run_dir = tmp / "run"
        self.root = self.run_dir / "checkpoints"
        self.flag = tmp / "failpoint-hit"
        self.cmd = accelerate_cmd() + smoke_overrides(self.run_dir, digits_dir, *more)
        self.resume_from = 0  # the checkpoint step the next launch must resume from
        self.damaged = ""  # a checkpoint the next launch must skip, with a warning
        self.launches = self.exact = self.wrong_choice = 0
        self.ref = {r["step"]: r for r in train_records(reference)}

    def _expect_resume(self, out: str) -> None:
        if self.damaged:  # the launch after a corruption says what it skipped
            assert "skipping damaged checkpoint" in out and self.damaged in out, out[-3000:]
            self.damaged = ""
        if self.resume_from:
            want = f"resumed from {self.root / f'step-{self.resume_from}'} (step {self.resume_from}, exact)"
            if want not in out:
                self.wrong_choice += 1
            assert want in out, f"expected: {want}\n{out[-3000:]}"
        else:
            assert "resumed from" not in out, out[-3000:]

    def _check_logged_steps(self) -> None:
        """Whatever the launches logged so far is the reference's steps 1..n, exactly."""
        got = train_records(self.run_dir)
        assert [r["step"] for r in got] == list(range(1, len(got) + 1))
        for r in got:
            for key in ("train/loss", "train/lr", "train/grad_norm"):
                assert r[key] == self.ref[r["step"]][key], (r["step"], key)

    def kill_at(self, failpoint: str, timeout: float = 240, past: int = 0) -> str:
        """Launch with one pausing failpoint; SIGKILL the launcher and ranks once it is hit (and,
        with `past`, once the loop has logged that step: it trains on while a save is paused)."""
        self.flag.unlink(missing_ok=True)
        env = dict(self.env, TRIBUTARY_FAILPOINTS=f"{failpoint}=pause", TRIBUTARY_FAILPOINT_FLAG=str(self.flag))
        log = self.tmp / f"launch{self.launches}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            hit = wait_for(lambda: self.flag.exists() and last_step(self.run_dir) >= past, proc, timeout)
            kill_tree(proc.pid)
            proc.wait()
        self.launches += 1
        out = log.read_text()
        assert hit, f"failpoint {failpoint} never hit (or no step {past} logged after it):\n{out[-3000:]}"
        assert not (self.run_dir / "final_metrics.json").exists()
        self._expect_resume(out)
        self._check_logged_steps()
        return out

    def expect_latest(self, step: int) -> None:
        """`latest` must pick step-N (or nothing for 0), and what it picks must verify."""
        chosen = latest(self.root)
        got = 0 if chosen is None else int(chosen.name.split("-")[1])
        if chosen is not None and verify(chosen) is not None:
            self.wrong_choice += 1
        assert got == step, f"latest() chose step {got}, expected {step}"
        self.resume_from = step

    def finish(self) -> str:
        out = run_ok(self.cmd, self.env)
        self.launches += 1
        self._expect_resume(out)
        assert_matches_reference(self.run_dir, self.reference)
        return out


def below(step: int) -> int:
    """The newest checkpoint step before `step` (0: none)."""
    return (step - 1) // EVERY * EVERY


def corrupt(ckpt: Path, rng: random.Random, flip: bool, name: str | None = None) -> str:
    """Flip one bit of, or truncate, one file (`name`, or a random one) of a complete checkpoint."""
    name = name or rng.choice(sorted(json.loads((ckpt / MARKER).read_text())["files"]))
    path = ckpt / name
    data = bytearray(path.read_bytes())
    if flip:
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        how = f"bit flip at byte {at} of {name}"
    else:
        data = data[: rng.randrange(len(data))]
        how = f"truncated {name} to {len(data)} bytes"
    path.write_bytes(bytes(data))
    return how


@pytest.mark.timeout(2400)
def test_sigkill_at_random_steps_and_inside_saves(tmp_path, digits_dir, cpu_env, smoke_reference):
    """SIGKILLs at random steps, inside saves (a random stage, a random rank paused there),
    and a corrupted newest checkpoint, all on one run: every resumed launch repeats the
    reference's steps exactly and resumes from the checkpoint it should."""
    rng = seeded("kill drill")
    chain = Chain(tmp_path, digits_dir, cpu_env, smoke_reference)
    stages = (SAVE_STAGES * TRIALS)[:TRIALS]  # every stage once before any twice
    rng.shuffle(stages)
    corrupted, random_kills, save_kills = [], 0, 0
    first_flip = rng.randrange(2)  # then truncations and bit flips alternate
    for i in range(TRIALS):
        k = rng.randrange(chain.resume_from + 1, STEPS)  # killed after step k, rank r paused there
        chain.kill_at(f"step.end@{k}/{rng.randrange(2)}")
        chain.expect_latest(below(k))
        random_kills += 1
        # a kill inside a save: any save after the resume point, the final one included
        saves = list(range(chain.resume_from + EVERY, STEPS + 1, EVERY))
        stage = stages[i] if saves[0] < STEPS else rng.choice(SAVE_STAGES[:-1])
        step = rng.choice(saves if stage != "save.prune" else saves[:-1] or saves)
        rank = rng.randrange(2)
        if step == STEPS and stage in ("save.rename", "save.prune"):
            # a finished run has nothing left to kill: stop rank 0 before its rename
            stage, rank = "save.rename", 0
        chain.kill_at(f"{stage}@{step}/{rank}")
        # the paused rank stops before its part of that stage; the others do theirs. Rank 0
        # alone writes the marker and renames, so rank 1 paused at save.rename means renamed
        renamed = stage == "save.prune" or (stage == "save.rename" and rank == 1)
        if stage in ("save.model", "save.write", "save.marker") or (stage == "save.rename" and rank == 0):
            assert (chain.root / f".step-{step}.partial").is_dir()  # half-written, on disk
        chain.expect_latest(step if renamed else below(step))
        save_kills += 1
        if chain.resume_from and (TRIALS == 1 or i % 3 == 2):
            newest = chain.root / f"step-{chain.resume_from}"
            # the first: a bit flip in rank 1's model and optimizer shard; then any file
            name = None if corrupted else "state/__1_0.distcp"
            corrupted.append(
                corrupt(newest, rng, flip=not corrupted or (len(corrupted) + first_flip) % 2 == 0, name=name)
            )
            assert verify(newest) is not None
            chain.damaged = str(newest)
            older = [int(p.name.split("-")[1]) for p in complete_checkpoints(chain.root)]
            chain.expect_latest(max([s for s in older if s < chain.resume_from], default=0))
    chain.finish()
    report(
        "kills",
        seed=rng.seed_value,
        random_step_kills=random_kills,
        kills_inside_save=save_kills,
        corrupted_checkpoints=corrupted,
        launches=chain.launches,
        resumed_exactly=f"{chain.launches - 1}/{chain.launches - 1}",
        wrong_or_corrupt_checkpoint_chosen=chain.wrong_choice,
    )
    assert chain.wrong_choice == 0


@pytest.mark.timeout(2400)
def test_async_saves_killed_in_the_background(tmp_path, digits_dir, cpu_env, smoke_reference):
    """trainer.checkpoint_async: a rank's background write (or its digests, rename, prune) is
    paused while the loop trains on past that save; a SIGKILL then leaves the previous
    checkpoint chosen (the new one once renamed), and the resumed run repeats the synchronous
    reference's steps exactly."""
    rng = seeded("async drill")
    chain = Chain(tmp_path, digits_dir, cpu_env, smoke_reference, "trainer.checkpoint_async=true")
    stages = ["save.write"] + rng.choices(BACKGROUND_STAGES, k=TRIALS - 1)
    kills = []
    for stage in stages:
        saves = list(range(chain.resume_from + EVERY, STEPS, EVERY))  # not the last: the loop goes on after it
        if not saves:
            break
        # one of the next two saves, so that ten kills fit in the run's four non-final saves
        step, rank = rng.choice(saves[:2]), 1 if len(kills) == 0 else rng.randrange(2)
        chain.kill_at(f"{stage}@{step}/{rank}", past=step + 5)
        renamed = stage == "save.prune" or (stage == "save.rename" and rank == 1)
        chain.expect_latest(step if renamed else below(step))
        kills.append(f"{stage}@{step}/{rank}")
    chain.finish()
    report(
        "async_kills",
        seed=rng.seed_value,
        kills_in_background=kills,
        launches=chain.launches,
        resumed_exactly=f"{chain.launches - 1}/{chain.launches - 1}",
        wrong_or_corrupt_checkpoint_chosen=chain.wrong_choice,
    )
    assert chain.wrong_choice == 0


def _direct_ranks(run_dir: Path, digits_dir, env, failpoints: str, *more) -> list[subprocess.Popen]:
    """Two ranks started by hand (RANK/WORLD_SIZE, as `srun` starts them): no agent that
    would tear the group down for us when one rank dies."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "launch.train", "--config", RECIPE, *smoke_overrides(run_dir, digits_dir, *more)]
    procs = []
    for rank in range(2):
        e = dict(
            env,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TRIBUTARY_FAILPOINTS=failpoints,
        )
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return procs


# the hung rank waits out trainer.dist_timeout_s: make fault-drills runs it, make test does not
@pytest.mark.parametrize("how", ["kill", pytest.param("stop", marks=pytest.mark.drill)])
def test_a_rank_dying_alone_stops_the_other_with_a_clear_message(how, tmp_path, digits_dir, cpu_env):
    """Rank 1 SIGKILLs itself (its sockets close) or SIGSTOPs itself (hung: nothing closes)
    after step 50; rank 0 must exit with code 4 naming the cause and the checkpoint to
    resume from, within trainer.dist_timeout_s, not hang."""
    timeout_s = 10
    r0, r1 = _direct_ranks(
        tmp_path / "run", digits_dir, cpu_env, "step.end@50/1=" + how, f"trainer.dist_timeout_s={timeout_s}"
    )
    start = time.time()
    try:
        out, _ = r0.communicate(timeout=180)
        waited = round(time.time() - start, 1)
    finally:
        r1.kill()
        r1.wait()
    assert r0.returncode == 4, out[-3000:]
    line = [x for x in out.splitlines() if x.startswith("error: rank 0: lost contact")]
    assert line, out[-3000:]
    assert "after step 50" in line[0] and "checkpoints/step-40" in line[0], line[0]
    assert "Timed out" in line[0] if how == "stop" else "Timed out" not in line[0]
    assert verify(tmp_path / "run/checkpoints/step-40") is None
    report("lost_rank", how=how, exit_code=r0.returncode, message=line[0][:200], waited=waited)


def test_nonfinite_loss_skip(tmp_path, digits_dir, cpu_env):
    """trainer.nonfinite=skip: rank 1's loss of step 41 is NaN, rank 0's of step 45 Inf.
    Every rank leaves those updates out (the weights and optimizer state after step 41
    equal those after 40; 45 equal 44), counts them, logs them, and goes on."""
    import torch

    run_dir = tmp_path / "run"
    env = dict(cpu_env, TRIBUTARY_FAILPOINTS="step.loss@41/1=nan,step.loss@45/0=inf")
    out = run_ok(
        accelerate_cmd()
        + smoke_overrides(
            run_dir,
            digits_dir,
            "trainer.nonfinite=skip",
            "trainer.max_steps=60",
            "trainer.checkpoint_every=1",
            "trainer.keep_last_k=100",
        ),
        env,
    )
    assert "step 41: grad norm nan, step skipped (trainer.nonfinite=skip; 1 so far)" in out
    assert "step 45: grad norm " in out and "(trainer.nonfinite=skip; 2 so far)" in out
    ckpt = run_dir / "checkpoints"

    def same_state(a: int, b: int) -> bool:  # weights and AdamW moments and step counts
        sa, sb = (read_all(ckpt / f"step-{s}/state") for s in (a, b))
        tensors = [k for k in sa if torch.is_tensor(sa[k])]
        assert any(k.startswith("model.") for k in tensors) and any(k.endswith(".exp_avg") for k in tensors)
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in tensors)

    assert same_state(40, 41) and same_state(44, 45)
    assert not same_state(41, 42)  # the steps around them do train
    recs = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/lr" in r}
    assert sorted(recs) == list(range(1, 61)) and recs[60]["train/skipped_nonfinite"] == 2
    assert "train/loss" not in recs[41] and "train/loss" not in recs[45]
    assert all(math.isfinite(recs[s]["train/loss"]) for s in recs if s not in (41, 45))
    assert json.loads((ckpt / "step-60/trainer_state.json").read_text())["skipped_nonfinite"] == 2
    assert math.isfinite(json.loads((run_dir / "final_metrics.json").read_text())["test/nll"])
    report("nonfinite_skip", skipped=recs[60]["train/skipped_nonfinite"], weights_unchanged=True)


def test_nonfinite_loss_halt(tmp_path, digits_dir, cpu_env):
    """trainer.nonfinite=halt (the default): rank 1's loss of step 45 is Inf. The ranks stop
    at the next log step (50) with exit 6, naming rank 1 and the steps; no checkpoint after
    step 40 exists, so nothing poisoned can ever be resumed from."""
    run_dir = tmp_path / "run"
    env = dict(cpu_env, TRIBUTARY_FAILPOINTS="step.loss@45/1=inf")
    cmd = accelerate_cmd() + smoke_overrides(run_dir, digits_dir, "trainer.log_every=10", "trainer.checkpoint_every=20")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "exitcode  : 6" in text, text[-3000:]  # a rank's own code
    msg = [x for x in text.splitlines() if x.startswith("error: rank 0: non-finite")]
    assert msg and "loss at step 45 on rank(s) [1] (caught at step 50" in msg[0], text[-3000:]
    assert f"{run_dir / 'checkpoints/step-40'}, is kept" in msg[0]
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step-20", "step-40"]
    assert not list((run_dir / "checkpoints").glob(".step-*"))
    assert verify(run_dir / "checkpoints/step-40") is None
    report("nonfinite_halt", rank_exit_code=6, message=msg[0][:200])


# The disk drills run the job in a mount namespace of its own, on a tmpfs. Rank 0 stops
# for 3 s at the start of the step-80 save (a `sleep` failpoint); meanwhile the drill fills
# the tmpfs (or remounts it read-only), so the save meets a real ENOSPC (EROFS) mid-way.
# Checkpoint step-40 is complete by then. The run directory is copied out and resumed.
DISK_SCRIPT = r"""
set -u
mount -t tmpfs -o size=64m tmpfs "$RUN"
"$@" > "$OUT/job.log" 2>&1 &
job=$!
while [ ! -e "$TRIBUTARY_FAILPOINT_FLAG" ] && kill -0 $job 2>/dev/null; do sleep 0.02; done
if [ "$MODE" = full ]; then
  free=$(df --output=avail -B1 "$RUN" | tail -1)
  fallocate -l $((free - 96 * 1024)) "$RUN/filler"   # 96 KiB left: a checkpoint needs 170
else
  mount -o remount,ro "$RUN"
fi
wait $job
echo $? > "$OUT/rc"
rm -f "$RUN/filler" 2>/dev/null
cp -a "$RUN/." "$OUT/run/"
"""


@pytest.mark.drill  # make fault-drills (CI time: make test keeps the kills, lost rank and NaNs)
@pytest.mark.parametrize("mode", ["full", "readonly"])
def test_disk_full_or_read_only_during_a_save(mode, tmp_path, digits_dir, cpu_env, smoke_reference):
    if not shutil.which("unshare"):
        pytest.fail("the disk drills need util-linux's unshare (a private mount namespace)")
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    (out_dir / "run").mkdir(parents=True)
    cmd = accelerate_cmd() + smoke_overrides(run_dir, digits_dir)
    as_root = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    env = dict(
        cpu_env,
        RUN=str(run_dir),
        OUT=str(out_dir),
        MODE=mode,
        TRIBUTARY_FAILPOINTS=f"save.start@{2 * EVERY}/0=sleep",
        TRIBUTARY_FAILPOINT_FLAG=str(tmp_path / "failpoint-hit"),
    )
    done = subprocess.run(
        as_root + ["bash", "-c", DISK_SCRIPT, "drill", *cmd], env=env, capture_output=True, text=True, timeout=300
    )
    log = (out_dir / "job.log").read_text() if (out_dir / "job.log").exists() else ""
    assert done.returncode == 0, done.stderr[-2000:] + log[-3000:]
    rc = int((out_dir / "rc").read_text())  # the launcher's; a rank's own is in its report
    root = out_dir / "run/checkpoints"
    kept = [p.name for p in complete_checkpoints(root)]
    errors = [x for x in log.splitlines() if x.startswith("error: rank 0")]
    assert rc != 0 and "exitcode  : 5" in log, log[-3000:]
    assert errors and "checkpoint step-80 could not be written" in errors[0], log[-3000:]
    if mode == "full":  # torch.save's own words for ENOSPC do not say so; the free space does
        free = float(re.search(r"; ([\d.]+) MB free on its disk", errors[0]).group(1))
        assert free < 0.2 or "No space left on device" in errors[0], errors[0]
    else:
        assert "Read-only file system" in errors[0], errors[0]
    assert "step-40, is intact" in errors[0]
    assert kept == ["step-40"]
    if mode == "full":
        assert not list(root.glob(".step-*"))  # the half-written save was removed
    newest = root / kept[-1]
    assert verify(newest) is None  # intact: every checksum holds
    # room again: copy the run back and resume, exactly
    shutil.rmtree(run_dir)
    shutil.copytree(out_dir / "run", run_dir)
    out = run_ok(cmd, cpu_env)
    assert f"resumed from {run_dir / 'checkpoints' / kept[-1]}" in out
    assert_matches_reference(run_dir, smoke_reference)
    codes = sorted({int(c) for c in re.findall(r"exitcode\s+:\s+(-?\d+)", log)})
    report(
        "disk",
        mode=mode,
        rank_exit_codes=codes,
        failed_save=80,
        kept=kept[-1],
        error=errors[0][:240],
        resumed_exactly="1/1",
    )
