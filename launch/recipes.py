"""A recipe read with its workload's model schema: the launcher is where the trainer's config
and the model registry meet (the trainer knows no workload, the models no trainer)."""

from __future__ import annotations

import os

from models.registry import workload_config_class
from trainer.config import RunConfig, load_config


def load_recipe(recipe: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """trainer.config.load_config with `model.*` typed by the named workload's Config."""
    return load_config(recipe, overrides, model_schema=workload_config_class)
