"""Every benchmark starts both ways the docs run one, `python benchmarks/X.py` and
`python -m benchmarks.X`, from the repo root with no PYTHONPATH of ours; and
benchmarks/overhead.py reads its clock only once the GPU is done with the step it times."""

import ast
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
REPO_PACKAGES = {p.parent.name for p in ROOT.glob("*/__init__.py")}
UNIMPORTABLE = "unimportable repo packages:"
# Most benchmarks import the repo's packages only after parsing their arguments, so --help
# alone would pass without the repo root on sys.path: at exit, this says which of the
# packages the benchmark imports the process could not have found.
PROBE = f"""import atexit, importlib.util, os, sys

@atexit.register
def report():
    missing = [n for n in os.environ["PROBE_PACKAGES"].split() if importlib.util.find_spec(n) is None]
    if missing:
        print({UNIMPORTABLE!r}, *missing, file=sys.stderr)
"""


def repo_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & REPO_PACKAGES


@pytest.mark.parametrize("form", ["script", "module"])
@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_starts_as_a_script_and_as_a_module(path, form, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tmp_path), PROBE_PACKAGES=" ".join(sorted(repo_imports(path))))
    how = [str(path.relative_to(ROOT))] if form == "script" else ["-m", f"benchmarks.{path.stem}"]
    out = subprocess.run(
        [sys.executable, *how, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "usage:" in out.stdout, out.stdout + out.stderr
    assert UNIMPORTABLE not in out.stderr, out.stderr


@pytest.mark.parametrize("device", [torch.device("cuda", 1), torch.device("cpu")], ids=str)
def test_overhead_reads_the_clock_after_the_device_finishes(device, monkeypatch):
    """A CUDA step returns once its kernels are queued: the timed bare step and our step
    each end at a torch.cuda.synchronize, or one loop is charged the other's GPU time."""
    from benchmarks import overhead

    events = []
    clock = iter(range(100))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))
    monkeypatch.setattr(
        overhead, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or float(next(clock)))
    )
    bare = SimpleNamespace(device=device, step=lambda: events.append("bare step"))
    ours_s, bare_s = [], []
    paired = overhead.paired_hook(lambda net, step: events.append("our step"), bare, ours_s, bare_s)
    paired(None, 1)
    paired(None, 2)
    sync = ["sync cuda:1"] if device.type == "cuda" else []
    assert events == 2 * ["our step", *sync, "clock", "bare step", *sync, "clock"]
    assert (ours_s, bare_s) == ([1.0], [1.0, 1.0])
