"""Export a run's weights as one safetensors file plus the config that builds the model.

    python -m launch.export RUN_DIR [--which best|latest|PATH] [--out DIR]

The export is checked by loading it strictly into a freshly built model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_model, save_file

from models.registry import build_workload
from trainer.checkpoint import latest, verify
from trainer.config import load_config


def consolidate_deepspeed(checkpoint: Path) -> dict:
    """One fp32 state dict from a DeepSpeed checkpoint's ZeRO partitions (DeepSpeed's own
    zero_to_fp32), independent of the gathered copy the trainer writes beside it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.backends.deepspeed import DS_TAG

    if not (checkpoint / DS_TAG).is_dir():
        raise FileNotFoundError(f"{checkpoint}: no DeepSpeed engine checkpoint ({DS_TAG}/)")
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
    return {k: v.contiguous() for k, v in state.items()}


def export(run_dir: Path, which: str = "best", out: Path | None = None,
           from_engine: bool = False) -> Path:
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
    out.mkdir(parents=True, exist_ok=True)
    if from_engine:
        save_file(consolidate_deepspeed(src), str(out / "model.safetensors"))
    else:
        shutil.copyfile(src / "model.safetensors", out / "model.safetensors")
    load_model(model, str(out / "model.safetensors"), strict=True)  # the export must load
    shutil.copyfile(run_dir / "config.yaml", out / "config.yaml")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--which", default="best", help="best, latest, or a step-N folder")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--from-engine", action="store_true",
                        help="consolidate DeepSpeed's ZeRO partitions instead of copying the "
                             "gathered model.safetensors (needs --which latest or a step-N folder)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.which, args.out, args.from_engine)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{out}/model.safetensors (loads into model.name from {out}/config.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
