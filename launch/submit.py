"""Submit a recipe to SLURM: render one of slurm/*.sbatch for it, `sbatch` it, say where to look.

    python -m launch.submit --config configs/lm/causal_4k.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 2-00:00:00 run.dir=/shared/runs/causal_4k
    python -m launch.submit ... --dry-run        # print the script, submit nothing

The recipe is read and checked here first (a bad key fails before anything is queued), and
the shard count is checked against nodes x GPUs x loader workers. The rendered script is
kept in RUN_DIR/slurm/ beside the job's logs. The job requeues itself on SIGUSR1 (sent
--grace seconds before the time limit) and resumes from its newest checkpoint, so one
submission carries a run past any number of time limits and preemptions.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data_pipelines.stream import DataError, check_readers, resolve_shards
from launch.cli import program
from launch.recipes import load_recipe
from trainer.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = {name: ROOT / "slurm" / f"{name}.sbatch" for name in ("torchrun", "accelerate", "deepspeed")}
SETTINGS = re.compile(r"^# >>> settings\n.*?^# <<< settings\n", re.S | re.M)


def sbatch_header(a, name: str, log_dir: Path) -> list[str]:
    lines = [f"--job-name={name}", f"--nodes={a.nodes}", "--ntasks-per-node=1"]
    if not a.cpu:
        lines.append(f"--gpus-per-node={a.gpus_per_node}")
    if a.cpus_per_task:
        lines.append(f"--cpus-per-task={a.cpus_per_task}")
    for flag in ("partition", "account", "time", "qos", "constraint"):
        if getattr(a, flag):
            lines.append(f"--{flag}={getattr(a, flag)}")
    lines += [
        "--requeue",
        "--open-mode=append",
        f"--signal=B:USR1@{a.grace}",
        f"--output={log_dir}/%x-%j.out",
        f"--chdir={ROOT}",
    ]
    lines += a.sbatch_arg
    return [f"#SBATCH {line}" for line in lines]


def render(a, recipe: str, overrides: list[str], run_dir: Path, name: str) -> str:
    """The chosen template with our #SBATCH lines, settings and arguments filled in."""
    template = TEMPLATES[a.launcher].read_text()
    log_dir = run_dir / "slurm"
    lines = template.splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    about = lines[1 : lines.index("#\n")]  # the template's first paragraph: what it does
    header = (
        lines[0] + f"# Rendered by `python -m launch.submit` from slurm/{a.launcher}.sbatch "
        f"on {time.strftime('%Y-%m-%d %H:%M')}.\n" + "".join(about) + "\n".join(sbatch_header(a, name, log_dir)) + "\n"
    )
    body = "".join(lines[last + 1 :])
    settings = [
        f"export PYTHON={shlex.quote(a.python)}",
        f"export PROCS_PER_NODE={a.gpus_per_node}",
        f"LOG_DIR={shlex.quote(str(log_dir))}",
    ]
    if a.launcher == "torchrun":
        settings.append(f"MAX_RESTARTS={a.max_restarts}")
    if a.cpu:
        settings.append("export ACCELERATE_USE_CPU=1  # --cpu: processes on CPUs, gloo")
    settings.append(f"set -- {shlex.join([recipe, *overrides])}")
    filled = "# >>> settings (written by launch.submit)\n" + "\n".join(settings) + "\n# <<< settings\n"
    body, n = SETTINGS.subn(lambda _: filled, body)
    assert n == 1, f"{TEMPLATES[a.launcher]} lost its settings block"
    return header + body


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog=program("launch.submit"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides: run.dir=/shared/runs/x ...")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="ranks per node (one per GPU)")
    p.add_argument(
        "--launcher",
        choices=sorted(TEMPLATES),
        default=None,
        help="default: deepspeed for trainer.backend=deepspeed, else torchrun",
    )
    for flag in ("--partition", "--account", "--qos", "--constraint"):
        p.add_argument(flag, help=f"#SBATCH {flag}")
    p.add_argument("--time", help="the job's time limit, e.g. 2-00:00:00; the run requeues itself past it")
    p.add_argument(
        "--grace", type=int, default=300, help="seconds before the time limit that SIGUSR1 arrives (save + requeue)"
    )
    p.add_argument("--cpus-per-task", type=int, default=0)
    p.add_argument(
        "--max-restarts", type=int, default=0, help="torchrun only: restart all ranks this often after a rank dies"
    )
    p.add_argument(
        "--cpu", action="store_true", help="ranks on CPUs with gloo (debugging a cluster setup without GPUs)"
    )
    p.add_argument("--python", default=sys.executable, help="interpreter on the nodes (default: this one)")
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="OPT",
        help="extra #SBATCH option, e.g. --sbatch-arg=--exclusive (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    p.add_argument(
        "--wait", action="store_true", help="return when the job ends (through requeues), with its exit code"
    )
    a = p.parse_args(argv)
    if a.nodes < 1 or a.gpus_per_node < 1:
        p.error("--nodes and --gpus-per-node must be >= 1")

    try:
        cfg = load_recipe(a.config, a.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        d = cfg.data
        train = resolve_shards(d.train.urls, d.train.manifest, key="data.train.urls")
        check_readers(len(train.urls), a.nodes * a.gpus_per_node, d.num_workers, key="data.train.urls")
    except DataError as exc:
        # a dry run may be rendered where the cluster's filesystem is not mounted
        print(f"{'warning' if a.dry_run else 'error'}: {exc}", file=sys.stderr)
        if not a.dry_run:
            return 2
    if a.launcher is None:
        a.launcher = "deepspeed" if cfg.trainer.backend == "deepspeed" else "torchrun"
    if a.max_restarts and a.launcher != "torchrun":
        print(f"error: --max-restarts is a torchrun setting; --launcher is {a.launcher}", file=sys.stderr)
        return 2
    if a.launcher == "accelerate" and cfg.trainer.backend == "deepspeed":
        print(
            "error: --launcher accelerate with trainer.backend=deepspeed: use --launcher "
            "deepspeed or torchrun (the trainer builds the DeepSpeed engine itself)",
            file=sys.stderr,
        )
        return 2

    run_dir = Path(cfg.run.dir).resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.run.name or run_dir.name)
    recipe = str(Path(a.config).resolve())
    overrides = [o for o in a.overrides if not o.startswith("run.dir=")] + [f"run.dir={run_dir}"]
    script = render(a, recipe, overrides, run_dir, name)
    if a.dry_run:
        print(script, end="")
        return 0

    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print("error: sbatch is not on PATH (use --dry-run to see the script)", file=sys.stderr)
        return 2
    log_dir = run_dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    proc = subprocess.Popen(
        [sbatch, "--parsable"] + (["--wait"] if a.wait else []) + [str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()  # the job id, printed at once even with --wait
    if not first.strip():
        err = proc.communicate()[1]
        print(f"error: sbatch refused {path}: {err.strip()}", file=sys.stderr)
        return 2
    job = first.strip().split(";")[0]
    print(
        f"submitted job {job}: {a.nodes} node(s) x {a.gpus_per_node} rank(s), {a.launcher}\n"
        f"  script       {path}\n"
        f"  batch log    {log_dir}/{name}-{job}.out\n"
        f"  node logs    {log_dir}/{name}-{job}-node<N>.out\n"
        f"  tensorboard  tensorboard --logdir {run_dir / 'tensorboard'} --host 127.0.0.1\n"
        f"  follow       squeue -j {job}; tail -f {log_dir}/{name}-{job}.out",
        flush=True,
    )
    if not a.wait:
        proc.wait()
        return 0
    rest, err = proc.communicate()
    if proc.returncode != 0:
        print(f"job {job} ended with exit code {proc.returncode}: {err.strip()}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
