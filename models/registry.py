"""Workload registry: `model.name` in a recipe -> (Workload class, its Config dataclass).

`model.name` is a registered short name (`made`, `lm`, `sd`, ...) or the import path of a
workload in the user's own package, `my_pkg.my_module:MyWorkload` (importable from where
the launch runs: installed, on PYTHONPATH, or in the current directory).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from models.base import Workload

_WORKLOADS: dict[str, type[Workload]] = {}


def register(name: str):
    def wrap(cls: type[Workload]) -> type[Workload]:
        if name in _WORKLOADS:
            raise ValueError(f"workload '{name}' registered twice")
        _WORKLOADS[name] = cls
        return cls

    return wrap


def _load_families() -> None:
    import models.autoregressive  # noqa: F401  (registers its workloads)
    import models.detr.workload  # noqa: F401
    import models.lm.workload  # noqa: F401
    import models.oadtr.workload  # noqa: F401
    import models.score.workload  # noqa: F401
    import models.sd.vae  # noqa: F401
    import models.sd.workload  # noqa: F401


def names() -> list[str]:
    _load_families()
    return sorted(_WORKLOADS)


def workload_class(name: str) -> type[Workload]:
    if ":" in name:
        return imported_workload(name)
    _load_families()
    if name not in _WORKLOADS:
        raise ValueError(
            f"unknown workload '{name}'; known: {', '.join(names())}, or an import "
            "path of your own, my_pkg.my_module:MyWorkload"
        )
    return _WORKLOADS[name]


def imported_workload(path: str) -> type[Workload]:
    """`module:Class` -> the Workload subclass, checked; a ValueError names what is wrong."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"'{path}': cannot import {module_name} ({exc}); install your package, put its "
            "folder on PYTHONPATH, or launch from the folder that holds it"
        ) from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Workload)):
        found = "nothing" if cls is None else type(cls).__name__
        raise ValueError(f"'{path}': {module_name}.{attr} is {found}, not a subclass of models.base.Workload")
    config = getattr(cls, "Config", None)
    if not (dataclasses.is_dataclass(config) and "name" in {f.name for f in dataclasses.fields(config)}):
        raise ValueError(
            f"'{path}': {attr}.Config must be a dataclass with a `name: str` field "
            "(the recipe's model.* keys are checked against it)"
        )
    return cls


def workload_config_class(name: str) -> type:
    return workload_class(name).Config


def build_workload(model_cfg: Any) -> Workload:
    return workload_class(model_cfg.name)(model_cfg)
