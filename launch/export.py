"""Export a run's weights as one safetensors file plus the config that builds the model.

    python -m launch.export RUN_DIR [--which best|latest|PATH] [--out DIR]

The export is checked by loading it strictly into a freshly built model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_model

from models.registry import build_workload
from trainer.checkpoint import latest, verify
from trainer.config import load_config


def export(run_dir: Path, which: str = "best", out: Path | None = None) -> Path:
    if which == "best":
        src = run_dir / "best"
        if not (src / "model.safetensors").exists():
            raise FileNotFoundError(f"{src}: no best export (the run had no validation split?)")
    elif which == "latest":
        src = latest(run_dir / "checkpoints")
        if src is None:
            raise FileNotFoundError(f"{run_dir}/checkpoints: no complete checkpoint")
    else:
        src = Path(which)
        problem = verify(src)
        if problem:
            raise FileNotFoundError(problem)
    out = out or run_dir / "export"
    cfg = load_config(run_dir / "config.yaml", ["trainer.resume=never"])
    model = build_workload(cfg.model).build_model()
    load_model(model, str(src / "model.safetensors"), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "model.safetensors", out / "model.safetensors")
    shutil.copyfile(run_dir / "config.yaml", out / "config.yaml")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--which", default="best", help="best, latest, or a step-N folder")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.which, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{out}/model.safetensors (loads into model.name from {out}/config.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
