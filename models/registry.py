"""Workload registry: `model.name` in a recipe -> (Workload class, its Config dataclass)."""

from __future__ import annotations

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
    _load_families()
    if name not in _WORKLOADS:
        raise ValueError(f"unknown workload '{name}'; known: {', '.join(names())}")
    return _WORKLOADS[name]


def workload_config_class(name: str) -> type:
    return workload_class(name).Config


def build_workload(model_cfg: Any) -> Workload:
    return workload_class(model_cfg.name)(model_cfg)
