"""The run directory's writer and its record of launches.

One launch writes a run dir at a time. Its rank 0 holds `run.dir/lock.json` (host, pid, SLURM
job, start time, and a heartbeat it refreshes while it runs); a second launch is refused
before any process group forms, naming the holder. `flock` alone cannot do this: on many
shared filesystems its locks are local to a node or not kept at all, so the lock is a file
made with a hard link (atomic on NFS and Lustre) and judged alive by its heartbeat. A holder
is taken over, with a warning, when

  - its heartbeat is older than trainer.lock_stale_s (it died on another node, or hung),
  - it ran on this host and its process is gone (SIGKILL, OOM killer, a crashed rank 0), or
  - it is this same SLURM job (a requeue), or an earlier start of this torchrun launch (the
    elastic agent restarted its ranks, rank 0 maybe on another node).

Every launch also writes its resolved config to `run.dir/launches/<n>.yaml`; `config.yaml`
is the config the latest checkpoint was written with (a fresh run's, until it has one).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = "lock.json"


class RunDirLocked(RuntimeError):
    """Another live launch holds this run dir."""


@dataclass
class Holder:
    host: str
    pid: int
    slurm_job: str | None
    started: float
    heartbeat: float
    token: str
    launch: str | None = None  # TORCHELASTIC_RUN_ID, when the launcher names its run
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT

    @classmethod
    def this_process(cls, slurm_job: str | None, now: float) -> Holder:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            slurm_job=slurm_job,
            started=now,
            heartbeat=now,
            token=uuid.uuid4().hex,
            launch=run_id if run_id not in ("", "none") else None,
            restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
        )

    def describe(self, now: float) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (
            f"pid {self.pid} on {self.host}{job}, started {started}, "
            f"last heartbeat {max(0.0, now - self.heartbeat):.0f}s ago"
        )


def read_holder(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # not ours, or cut short by a crash: judged by the file's age alone
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        return Holder(host="?", pid=-1, slurm_job=None, started=mtime, heartbeat=mtime, token="?")


def _write(path: Path, holder: Holder) -> None:
    path.write_text(json.dumps(asdict(holder)))


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    try:  # a killed process its parent has not reaped yet still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _create(tmp: Path, path: Path) -> bool:
    """Put `tmp`'s content at `path` unless something is there: a hard link (atomic on NFS and
    Lustre too), or O_EXCL where the filesystem has no hard links."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # EPERM/ENOTSUP: no hard links here (some FUSE and object-store mounts)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
        return True


def stale_reason(holder: Holder, me: Holder, stale_s: float, now: float) -> str | None:
    """Why `holder` no longer writes this run dir, or None while it is alive."""
    if now - holder.heartbeat > stale_s:
        return f"no heartbeat for {now - holder.heartbeat:.0f}s (trainer.lock_stale_s={stale_s:g})"
    if holder.slurm_job and holder.slurm_job == me.slurm_job:
        return f"it is this SLURM job ({me.slurm_job}), requeued or restarted"
    if holder.launch and holder.launch == me.launch and holder.restart < me.restart:
        return f"it is start {holder.restart} of this launch ({me.launch}), which its launcher restarted"
    if holder.host == me.host and holder.pid != me.pid and _process_gone(holder.pid):
        return f"its process {holder.pid} on this host is gone"
    return None


class RunDirLock:
    """`RunDirLock.acquire(run_dir, stale_s)` or raise RunDirLocked; `release()` at the end."""

    def __init__(self, path: Path, me: Holder, stale_s: float, made_dir: bool = False):
        self.path, self.me, self.stale_s = path, me, stale_s
        self.made_dir = made_dir  # a launch refused before it wrote anything leaves no empty run dir
        for leftover in path.parent.glob(".lock.*.beat"):  # a holder killed mid-heartbeat
            leftover.unlink(missing_ok=True)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="run-dir-lock", daemon=True)
        self._beat.start()

    @classmethod
    def acquire(
        cls, run_dir: Path, stale_s: float, *, slurm_job: str | None = None, settle_s: float = 0.2
    ) -> RunDirLock:
        made_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        now = time.time()
        me = Holder.this_process(slurm_job, now)
        tmp = run_dir / f".lock.{me.token}.tmp"
        _write(tmp, me)
        try:
            for _ in range(5):
                if _create(tmp, path):
                    return cls(path, me, stale_s, made_dir)
                holder = read_holder(path)
                if holder is None:
                    continue  # released meanwhile: try again
                now = time.time()
                why = stale_reason(holder, me, stale_s, now)
                if why is None:
                    raise RunDirLocked(
                        f"run.dir {run_dir} is in use by another launch ({holder.describe(now)}); "
                        f"two jobs writing one run dir would interleave its checkpoints and logs. Use "
                        f"another run.dir, or wait: a holder that stops its heartbeat is taken over "
                        f"after trainer.lock_stale_s={stale_s:g}s"
                    )
                log.warning("run.dir %s: taking over the lock of %s: %s", run_dir, holder.describe(now), why)
                os.replace(tmp, path)
                # two launches taking over at once: the last rename wins, the other sees it
                time.sleep(settle_s)
                now_holder = read_holder(path)
                if now_holder is None or now_holder.token != me.token:
                    raise RunDirLocked(
                        f"run.dir {run_dir}: another launch took the stale lock first "
                        f"({now_holder.describe(time.time()) if now_holder else 'gone'})"
                    )
                return cls(path, me, stale_s, made_dir)
            raise RunDirLocked(
                f"run.dir {run_dir}: {path} keeps appearing and vanishing; is another "
                "launch starting and stopping in it?"
            )
        finally:
            tmp.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        every = max(0.5, min(30.0, self.stale_s / 6))
        tmp = self.path.with_name(f".lock.{self.me.token}.beat")
        failing = False
        while not self._stop.wait(every):
            try:
                holder = read_holder(self.path)
                if holder is None or holder.token != self.me.token:
                    self.lost = holder.describe(time.time()) if holder else "no lock file"
                    log.error(
                        "run.dir lock %s was taken over (%s); this launch no longer owns the run dir",
                        self.path,
                        self.lost,
                    )
                    return
                self.me.heartbeat = time.time()
                _write(tmp, self.me)
                os.replace(tmp, self.path)
            except OSError as exc:  # a storage hiccup (or a full disk): the next beat tries again
                if not failing:
                    log.warning("run.dir lock %s: heartbeat failed (%s); retrying every %gs", self.path, exc, every)
                failing = True
            else:
                failing = False

    def release(self) -> None:
        """Never raises: the run's own outcome (and exit code) is what matters on the way out."""
        self._stop.set()
        self._beat.join(timeout=5)
        holder = read_holder(self.path)
        if holder is None or holder.token != self.me.token:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # a read-only or full run dir: the next launch finds this process gone
            log.warning("could not remove %s (%s); the next launch takes it over", self.path, exc.strerror or exc)
            return
        if self.made_dir:
            try:
                self.path.parent.rmdir()  # only if the launch left nothing in it
            except OSError:
                pass


def record_launch(run_dir: Path, text: str) -> Path:
    """This launch's resolved config as `launches/<n>.yaml`, n one past the highest so far."""
    folder = run_dir / "launches"
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(p.stem) for p in folder.glob("*.yaml") if p.stem.isdigit()]
    n = max(taken, default=0) + 1
    while True:
        path = folder / f"{n}.yaml"
        try:
            with open(path, "x") as f:
                f.write(text)
            return path
        except FileExistsError:
            n += 1


def write_config_record(run_dir: Path, launch: Path, text: str, step: int | None) -> None:
    """`config.yaml`: the config of `launch`, headed by which launch it is and why it is here."""
    why = (
        f"the checkpoints from step-{step} on were written with it"
        if step is not None
        else "the run has no checkpoint yet"
    )
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(f"# {launch.relative_to(run_dir)}: {why}\n{text}")
    os.replace(tmp, run_dir / "config.yaml")
