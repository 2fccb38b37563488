"""The package arrows point one way: launch -> trainer -> (models, data_pipelines).

models and data_pipelines never import trainer or launch; data_pipelines never imports
models; the trainer knows no workload (the launcher hands the registry over), and no
workload imports the toy-data generators of data_pipelines.sources. Every import counts,
those inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launch", "trainer", "models", "data_pipelines")
FORBIDDEN = {  # importer package -> module prefixes it may not import
    "models": ("trainer", "launch", "data_pipelines.sources"),
    "data_pipelines": ("trainer", "launch", "models"),
    "trainer": ("launch", "models"),
    "launch": (),
}


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the module being `module`
    (a package's __init__ when `is_package`: its `from . import x` is module.x)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                parts = module.split(".")
                base = parts[: len(parts) - node.level + is_package]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from pkg import sub` may name a submodule: count pkg.sub too
            out += [(node.lineno, name)] + [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def back_arrows(path: Path, source: str) -> list[str]:
    rel = path.relative_to(ROOT).with_suffix("")
    module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    bad = FORBIDDEN[rel.parts[0]]
    found = {}  # one report a line: its first forbidden name
    for line, name in imported_modules(source, module, is_package=rel.name == "__init__"):
        if line not in found and any(name == p or name.startswith(p + ".") for p in bad):
            found[line] = f"{path.relative_to(ROOT)}:{line} imports {name}"
    return list(found.values())


def test_no_module_imports_against_the_arrows():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found += back_arrows(path, path.read_text())
    assert not found, "imports against launch -> trainer -> (models, data_pipelines):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "where, line",
    [  # the arrows this test was written against
        ("data_pipelines/sources/latents.py", "from models.sd.data import image_tensor"),
        ("data_pipelines/sources/shapes.py", "def build():\n    from models.sd import tokenizer"),
        ("data_pipelines/sources/points.py", "def f():\n    from models.score.workload import mixture2d"),
        ("models/oadtr/workload.py", "from data_pipelines.sources import action_streams as streams"),
        ("models/sd/workload.py", "def f():\n    from data_pipelines.sources.shapes import COLORS"),
        ("models/score/workload.py", "from data_pipelines.sources.digits import binarized_digits"),
        ("models/detr/workload.py", "from data_pipelines.sources.shape_scenes import scene"),
        ("trainer/loop.py", "from models.flops import peak_tflops"),
        ("trainer/config.py", "def f():\n    from models.registry import workload_config_class"),
        ("models/lm/workload.py", "from trainer import checkpoint"),
        ("trainer/loop.py", "from launch import train"),
        ("data_pipelines/stream.py", "from ..trainer import config"),
        ("models/__init__.py", "from ..launch import train"),
    ],
)
def test_each_kind_of_back_arrow_is_found(where, line):
    assert back_arrows(ROOT / where, line), line


def test_allowed_arrows_pass():
    assert not back_arrows(ROOT / "models/sd/workload.py", "from data_pipelines.decode import image_tensor")
    assert not back_arrows(ROOT / "trainer/loop.py", "from data_pipelines.stream import ShardStream")
    assert not back_arrows(ROOT / "launch/train.py", "from models.registry import build_workload")
    assert not back_arrows(ROOT / "data_pipelines/sources/shapes.py", "from . import shards")
    assert not back_arrows(ROOT / "models/__init__.py", "from . import registry")
