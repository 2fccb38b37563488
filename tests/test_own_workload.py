"""A workload from the user's own package (`model.name: my_pkg.digit_mlp:DigitMLP`), as
docs/own-workload.md shows it: written into a folder outside the repository, trained on 2
ranks from there, resumed exactly, its TensorBoard scalars read back; a bad import path is
refused naming what is wrong."""

import os
import re
import sys

import pytest
import yaml
from launching import ROOT, accelerate_cmd, run_ok

from trainer.metrics import read_jsonl


def docs_workload() -> str:
    page = (ROOT / "docs/own-workload.md").read_text()
    return re.search(r"```python\n(.*?)```", page, re.S).group(1)


@pytest.fixture
def outside(tmp_path):
    """A user's folder with my_pkg/ and a recipe, and the env to launch from it."""
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg/__init__.py").write_text("")
    (tmp_path / "my_pkg/digit_mlp.py").write_text(docs_workload())
    assert not str(tmp_path).startswith(str(ROOT))
    return tmp_path


def recipe(folder, digits_dir, steps, run_dir):
    cfg = {
        "run": {"dir": str(run_dir)},
        "model": {"name": "my_pkg.digit_mlp:DigitMLP", "hidden": 32},
        "data": {
            "train": {"urls": f"{digits_dir}/train"},
            "val": {"urls": f"{digits_dir}/val"},
            "batch_size": 16,
            "shuffle_buffer": 64,
        },
        "optim": {"lr": 0.01, "schedule": "constant", "warmup_steps": 2},
        "trainer": {"max_steps": steps, "log_every": 1, "checkpoint_every": 10, "eval_every": 0, "progress_bar": False},
    }
    path = folder / f"digits-{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(folder, cfg, env, *more):
    # from the user's folder: python -m puts it on the path of every rank; the repository
    # is importable as it would be installed
    env = dict(env, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = accelerate_cmd()
    at = cmd.index("--config")
    return run_ok(cmd[:at] + ["--config", str(cfg), *more], env, cwd=folder)


def losses(run_dir):
    return [(r["step"], r["train/loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


def test_a_workload_from_outside_the_repository_trains_and_resumes_exactly(outside, digits_dir, cpu_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight, resumed = outside / "runs/straight", outside / "runs/resumed"
    out = launch(outside, recipe(outside, digits_dir, 20, straight), cpu_env)
    assert "backend: Accelerate DDP on 2 rank(s)" in out
    launch(outside, recipe(outside, digits_dir, 10, resumed), cpu_env)
    out = launch(outside, recipe(outside, digits_dir, 20, resumed), cpu_env)
    assert f"resumed from {resumed / 'checkpoints/step-10'} (step 10, exact)" in out
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 20

    acc = EventAccumulator(str(straight / "tensorboard"))
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb] == list(range(1, 21))
    assert [v for _, v in tb] == pytest.approx([v for _, v in losses(straight)], rel=1e-6)
    final = yaml.safe_load((straight / "final_metrics.json").read_text())
    assert 0.0 <= final["val/accuracy"] <= 1.0 and final["step"] == 20


@pytest.mark.parametrize(
    "name, said",
    [
        ("my_pkg.nowhere:DigitMLP", "cannot import my_pkg.nowhere"),
        ("my_pkg.digit_mlp:Missing", "my_pkg.digit_mlp.Missing is nothing, not a subclass of models.base.Workload"),
        ("my_pkg.digit_mlp:DigitMLPConfig", "is type, not a subclass"),
    ],
)
def test_a_bad_import_path_names_what_is_wrong(outside, monkeypatch, name, said):
    from launch.recipes import load_recipe
    from trainer.config import ConfigError

    monkeypatch.syspath_prepend(str(outside))
    cfg = load_recipe(
        None, ["run.dir=x", "model.name=my_pkg.digit_mlp:DigitMLP", "model.hidden=8", "data.train.urls=/x/{0..3}.tar"]
    )
    assert cfg.model.hidden == 8
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_recipe(None, ["run.dir=x", f"model.name={name}", "data.train.urls=/x/{0..3}.tar"])
    with pytest.raises(ConfigError, match="model.hidden2"):
        load_recipe(
            None,
            ["run.dir=x", "model.name=my_pkg.digit_mlp:DigitMLP", "model.hidden2=8", "data.train.urls=/x/{0..3}.tar"],
        )
    sys.modules.pop("my_pkg.digit_mlp", None)
    sys.modules.pop("my_pkg", None)
