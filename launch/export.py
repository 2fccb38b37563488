"""Export a run's weights as safetensors plus the config that builds the model.

    python -m launch.export RUN_DIR [--step N | --which best|latest|PATH] [--max-shard-size 5GB] [--out DIR]

The source is the run's best/ export (the default when there is one), its newest complete
checkpoint (`latest`, the default otherwise), `--step N`, or any step-N folder. Checkpoints of
every layout export: DCP shards (Accelerate DDP/FSDP2), DeepSpeed ZeRO partitions (consolidated
by DeepSpeed's converter) and the earlier whole-file layout. The output is Hugging Face-style:
`model.safetensors`, or `model-0000i-of-0000K.safetensors` + `model.safetensors.index.json`
past --max-shard-size. It is written a shard at a time, so the export needs about one shard
of memory, not the model; its tensor names and shapes are checked against the model built
from the run's config on the meta device (no memory either).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from launch.cli import program
from launch.recipes import load_recipe
from trainer.checkpoint import latest, verify
from trainer.export import check_shapes, export_checkpoint, parse_size


def source(run_dir: Path, which: str | None, step: int | None) -> Path:
    if step is not None:
        which = str(run_dir / "checkpoints" / f"step-{step}")
    if which is None:
        which = "best" if (run_dir / "best" / "meta.json").exists() else "latest"
    if which == "best":
        src = run_dir / "best"
        if not (src / "meta.json").exists():
            raise FileNotFoundError(
                f"{src}: no best export (the run had no validation split?); use --which latest or --step N"
            )
        return src
    if which == "latest":
        src = latest(run_dir / "checkpoints")
        if src is None:
            raise FileNotFoundError(f"{run_dir}/checkpoints: no complete checkpoint")
        return src
    problem = verify(Path(which))
    if problem:
        raise FileNotFoundError(problem)
    return Path(which)


def export(
    run_dir: Path,
    which: str | None = None,
    out: Path | None = None,
    *,
    step: int | None = None,
    max_shard_size: str = "5GB",
) -> tuple[Path, list[Path], str]:
    """(output folder, files written, what the shapes were checked against)."""
    import torch

    from models.registry import build_workload

    parse_size(max_shard_size, key="--max-shard-size")
    src = source(run_dir, which, step)
    out = out or run_dir / "export"
    # a checkpoint carries the config it was written with (best/ too); older ones: the run's
    recipe = src / "config.yaml" if (src / "config.yaml").is_file() else run_dir / "config.yaml"
    cfg = load_recipe(recipe, ["trainer.resume=never"])
    files = export_checkpoint(src, out, max_shard_size)
    try:
        with torch.device("meta"):
            model = build_workload(cfg.model).build_model()
        checked = f"the model of {recipe} (names and shapes)"
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built on meta is still exported
        model, checked = None, f"nothing: the model does not build on the meta device ({type(exc).__name__})"
    if model is not None:
        check_shapes(out, model, where=out)
    shutil.copyfile(recipe, out / "config.yaml")
    return out, files, f"from {src}; checked against {checked}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=program("launch.export"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--which", help="best, latest, or a step-N folder (default: best if the run has one)")
    parser.add_argument("--step", type=int, help="checkpoints/step-N of the run")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/export")
    args = parser.parse_args(argv)
    if args.step is not None and args.which is not None:
        parser.error("give --step or --which, not both")
    try:
        out, files, how = export(args.run_dir, args.which, args.out, step=args.step, max_shard_size=args.max_shard_size)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(f.name for f in files[:3]) + (f" ... ({len(files)} files)" if len(files) > 3 else "")
    print(f"{out}: {names} {how}; loads into model.name of {out}/config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
