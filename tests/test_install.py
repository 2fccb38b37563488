"""`pip install -e .` into a fresh venv makes the checkout's packages and the `tributary`
command work from any directory: a recipe trains from outside the checkout, and the
`python -m launch.X` forms still start there.

The venv borrows this one's installed packages through a .pth line (torch is not downloaded
again) and installs the checkout with --no-deps --no-index, so the test needs no network.
"""

from __future__ import annotations

import json
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "shards", "doctor", "submit", "export", "generate", "report")


def requirement_names(path: Path) -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-") for line in lines if line}


@pytest.fixture(scope="module")
def venv(tmp_path_factory, cpu_env):
    """A venv with the checkout installed editable; (its bin folder, an env without PYTHONPATH)."""
    where = tmp_path_factory.mktemp("venv")
    env = {k: v for k, v in cpu_env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=60)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    outside = tmp_path_factory.mktemp("outside")
    before = subprocess.run([str(python), "-c", "import launch"], cwd=outside, env=env, capture_output=True, text=True)
    assert before.returncode != 0, "the repo's packages import in the venv before the install"

    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-e",
            str(ROOT),
        ],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return where / "bin", env


def run(cmd, cwd, env, timeout=120):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_tributary_train_runs_a_recipe_from_outside_the_checkout(venv, digits_dir, tmp_path):
    bin_dir, env = venv
    run_dir = tmp_path / "run"
    out = run(
        [
            bin_dir / "tributary",
            "train",
            "--config",
            ROOT / "configs/autoregressive/made.yaml",
            f"run.dir={run_dir}",
            "trainer.max_steps=50",  # as long as the recipe's warmup: the LR ramps for the whole run
            "trainer.progress_bar=false",
            f"data.train.urls={digits_dir}/train",
            f"data.val.urls={digits_dir}/val",
            f"data.test.urls={digits_dir}/test",
        ],
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 50 and "test/nll" in final, final

    report = run([bin_dir / "tributary", "report", run_dir], cwd=tmp_path, env=env)
    assert report.returncode == 0 and re.search(r"^run\s.*\s50\s+50$", report.stdout, re.M), (
        report.stdout + report.stderr
    )  # its row: best step and steps


def test_the_command_lists_its_subcommands_and_the_module_forms_start(venv, tmp_path):
    bin_dir, env = venv
    out = run([bin_dir / "tributary", "--help"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^  (\w+)\s+launch\.\w+", out.stdout, re.M)
    assert tuple(listed) == COMMANDS, out.stdout
    assert "-m launch.train" in out.stdout  # how to start several processes

    for name in COMMANDS:  # each command's help and usage errors name it as typed
        help_ = run([bin_dir / "tributary", name, "--help"], cwd=tmp_path, env=env)
        assert help_.returncode == 0 and help_.stdout.startswith(f"usage: tributary {name} "), help_.stdout
    module_help = run([bin_dir / "python", "-m", "launch.export", "--help"], cwd=tmp_path, env=env)
    assert module_help.stdout.startswith("usage: python -m launch.export "), module_help.stdout

    unknown = run([bin_dir / "tributary", "fly"], cwd=tmp_path, env=env)
    assert unknown.returncode == 2 and "choose from train, shards" in unknown.stderr

    for module in ("launch.train", "launch.make_shards"):
        form = run([bin_dir / "python", "-m", module, "--help"], cwd=tmp_path, env=env)
        assert form.returncode == 0 and "usage:" in form.stdout, form.stdout + form.stderr
    where = run(
        [bin_dir / "python", "-c", "import launch, models; print(launch.__file__, models.__file__)"],
        cwd=tmp_path,
        env=env,
    )
    assert where.stdout.split() == [str(ROOT / "launch/__init__.py"), str(ROOT / "models/__init__.py")]


def test_the_package_requires_requirements_txt_and_the_test_extra(venv, tmp_path):
    """The install's dependencies are requirements.txt's names, the `test` extra is
    requirements-test.txt's, and everything they pin is what is installed here."""
    bin_dir, env = venv
    probe = "import importlib.metadata as m, json; print(json.dumps(m.requires('tributary')))"
    out = run([bin_dir / "python", "-c", probe], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    base, extra = set(), set()
    for req in json.loads(out.stdout):
        name = re.split(r"[=<>!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")
        (extra if 'extra == "test"' in req else base).add(name)
    assert base == requirement_names(ROOT / "requirements.txt")
    assert extra == requirement_names(ROOT / "requirements-test.txt")

    check = run([bin_dir / "python", "-m", "pip", "check"], cwd=tmp_path, env=env)
    ours = [line for line in check.stdout.splitlines() if line.lower().startswith("tributary ")]
    assert not ours, "\n".join(ours)
