"""Export a run's weights as safetensors plus the config that builds the model.

    python -m launch.export RUN_DIR [--step N | --which best|latest|PATH] [--max-shard-size 5GB] [--out DIR]
                                    [--format safetensors|hf]
    python -m launch.export RUN_DIR --pipeline [--step N | --which ...] [--out DIR] [--no-ema] [--fuse-lora]

The source is the run's best/ export (the default when there is one), its newest complete
checkpoint (`latest`, the default otherwise), `--step N`, or any step-N folder. Checkpoints of
every layout export: DCP shards (Accelerate DDP/FSDP2), DeepSpeed ZeRO partitions (joined by
DeepSpeed's own reader) and the earlier whole-file layout. The output is Hugging Face-style:
`model.safetensors`, or `model-0000i-of-0000K.safetensors` + `model.safetensors.index.json`
past --max-shard-size. It is written a shard at a time, so the export needs about one shard
of memory, not the model; its tensor names and shapes are checked against the model built
from the run's config on the meta device (no memory either). A subword LM's tokenizer comes
along as tokenizer.json.

`--format hf` writes a folder that transformers' AutoModelForCausalLM and AutoTokenizer load
with no custom code, for causal softmax-attention LMs (the classic block as GPT-NeoX, the
llama block as Llama; models/lm/hf.py), the tensors renamed on their way, shard by shard.
Models without a transformers class (FLASH, linear attention, masked) get the standard export
plus the tokenizer files, and a line that says so.

`--pipeline` writes a workload's own folder from the same sources (the sd workload: a diffusers
folder that StableDiffusionPipeline.from_pretrained loads, default RUN_DIR/pipeline-<source>),
with the code that writes pipeline/ at the end of a run: the EMA UNet when there is one
(--no-ema: the trained one); a LoRA run's base components plus pytorch_lora_weights.safetensors
(load_lora_weights), or with --fuse-lora a UNet with the adapters merged in. It holds the
checkpoint's model tensors in memory (a Stable Diffusion model's are a few GB).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from launch.cli import program
from launch.recipes import load_recipe
from trainer.checkpoint import check_model_shapes, latest, verify
from trainer.export import check_shapes, export_checkpoint, iter_exported, parse_size, shapes_in

FORMATS = ("safetensors", "hf")


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


def tokenizer_source(src: Path, model_cfg) -> Path | None:
    """The tokenizer a checkpoint was trained with: the recipe's model.tokenizer where it is still
    the same file (its folder may name the document separator), else the checkpoint's own copy;
    None for a byte-level model."""
    from data_pipelines.text_tokenizer import tokenizer_file
    from models.lm.workload import TOKENIZER_RECORD

    record = src / TOKENIZER_RECORD
    named = model_cfg.tokenizer
    if named:
        try:
            file = tokenizer_file(named)
        except FileNotFoundError:
            file = None
        if file is not None and (not record.is_file() or file.read_bytes() == record.read_bytes()):
            return Path(named)
    if record.is_file():
        return record
    if named:
        raise FileNotFoundError(f"model.tokenizer={named}: no such tokenizer, and {src} holds no {TOKENIZER_RECORD}")
    return None


def export(
    run_dir: Path,
    which: str | None = None,
    out: Path | None = None,
    *,
    step: int | None = None,
    max_shard_size: str = "5GB",
    format: str = "safetensors",
) -> tuple[Path, list[Path], str]:
    """(output folder, files written, what was written and checked against)."""
    import torch

    from models.registry import build_workload

    if format not in FORMATS:
        raise ValueError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    parse_size(max_shard_size, key="--max-shard-size")
    src = source(run_dir, which, step)
    out = out or run_dir / "export"
    # a checkpoint carries the config it was written with (best/ too); older ones: the run's
    recipe = src / "config.yaml" if (src / "config.yaml").is_file() else run_dir / "config.yaml"
    cfg = load_recipe(recipe, ["trainer.resume=never"])
    tokenizer = None
    if cfg.model.name == "lm":
        try:
            tokenizer = tokenizer_source(src, cfg.model)
        except FileNotFoundError:
            if format == "hf":
                raise
        if tokenizer is not None:
            cfg.model.tokenizer = str(tokenizer)  # the recipe's file may be gone: the model builds from the copy
    try:
        with torch.device("meta"):
            model = build_workload(cfg.model).build_model()
        checked = f"the model of {recipe} (names and shapes)"
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built on meta is still exported
        if format == "hf":
            raise ValueError(f"--format hf: the model of {recipe} does not build on the meta device: {exc}") from exc
        model, checked = None, f"nothing: the model does not build on the meta device ({type(exc).__name__})"
    if format == "hf":
        return _export_hf(src, recipe, cfg.model, model, tokenizer, out, max_shard_size)
    files = export_checkpoint(src, out, max_shard_size)
    if model is not None:
        check_shapes(out, model, where=out)
    shutil.copyfile(recipe, out / "config.yaml")
    if tokenizer is not None:
        from data_pipelines.text_tokenizer import tokenizer_file

        shutil.copyfile(tokenizer_file(tokenizer), out / "tokenizer.json")
        checked += f"; the run's tokenizer in {out}/tokenizer.json (model.tokenizer= it)"
    return out, files, f"from {src}; checked against {checked}; loads into model.name of {out}/config.yaml"


def export_pipeline(
    run_dir: Path,
    which: str | None = None,
    out: Path | None = None,
    *,
    step: int | None = None,
    use_ema: bool = True,
    fuse_lora: bool = False,
) -> tuple[Path, str]:
    """(output folder, what was written): the workload's `write_pipeline` on a checkpoint's weights."""
    from models.registry import build_workload

    src = source(run_dir, which, step)
    recipe = src / "config.yaml" if (src / "config.yaml").is_file() else run_dir / "config.yaml"
    cfg = load_recipe(recipe, ["trainer.resume=never"])
    workload = build_workload(cfg.model)
    if getattr(workload, "write_pipeline", None) is None:
        raise ValueError(f"--pipeline: model.name={cfg.model.name} of {recipe} has no pipeline export (sd has)")
    if fuse_lora and getattr(getattr(cfg.model, "lora", None), "rank", 0) == 0:
        raise ValueError(f"--fuse-lora: the run of {recipe} has no LoRA adapters (model.lora.rank=0)")
    out = Path(out or run_dir / f"pipeline-{src.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # every checkpoint layout becomes safetensors first (trainer/export.py), then one dict
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-weights-") as tmp:
        export_checkpoint(src, Path(tmp))
        weights = dict(iter_exported(Path(tmp)))
    how = workload.write_pipeline(weights, out, use_ema=use_ema, fuse_lora=fuse_lora)
    return out, f"{how}, from {src}; StableDiffusionPipeline.from_pretrained('{out}') loads it"


def _export_hf(src: Path, recipe: Path, model_cfg, model, tokenizer: Path | None, out: Path, max_shard_size: str):
    if model_cfg.name != "lm":
        raise ValueError(f"--format hf exports the lm workload's models; this run's model.name is {model_cfg.name}")
    from models.lm import hf

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("config.json", "generation_config.json"):  # an earlier export's into this folder
        (out / stale).unlink(missing_ok=True)
    ids = hf.write_tokenizer(out, model_cfg, tokenizer)
    reason = hf.unsupported(model_cfg)
    if reason:
        files = export_checkpoint(src, out, max_shard_size)
        check_shapes(out, model, where=out)
        shutil.copyfile(recipe, out / "config.yaml")
        return (
            out,
            files,
            (
                f"from {src}; {reason}: wrote the standard export (safetensors + config.yaml, loads into "
                f"model.name of {out}/config.yaml) and the tokenizer files (AutoTokenizer loads them), not a "
                "transformers model"
            ),
        )
    plan = hf.HFExport(model_cfg, model, ids)
    files = export_checkpoint(src, out, max_shard_size, convert=plan.convert)
    written = shapes_in(out)
    check_model_shapes(out, plan.expected_shapes(), written, lambda name: str(written[name]))
    plan.save(out)
    shutil.copyfile(recipe, out / "config.yaml")  # where it came from; transformers reads config.json
    arch = plan.config.architectures[0]
    return (
        out,
        files,
        (
            f"from {src}; {arch} with every tensor checked against transformers' model (names and shapes); "
            f"AutoModelForCausalLM.from_pretrained('{out}') and AutoTokenizer.from_pretrained('{out}') load it"
        ),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=program("launch.export"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--which", help="best, latest, or a step-N folder (default: best if the run has one)")
    parser.add_argument("--step", type=int, help="checkpoints/step-N of the run")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/export")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="safetensors",
        help="safetensors: our tensors + config.yaml (default); hf: a transformers model folder",
    )
    parser.add_argument(
        "--pipeline", action="store_true", help="the workload's own folder (sd: a diffusers pipeline), not tensors"
    )
    parser.add_argument("--no-ema", action="store_true", help="--pipeline: the trained weights, not their EMA")
    parser.add_argument(
        "--fuse-lora", action="store_true", help="--pipeline: merge a LoRA run's adapters into the UNet"
    )
    args = parser.parse_args(argv)
    if args.step is not None and args.which is not None:
        parser.error("give --step or --which, not both")
    if not args.pipeline and (args.no_ema or args.fuse_lora):
        parser.error("--no-ema and --fuse-lora go with --pipeline")
    if args.pipeline and args.format != "safetensors":
        parser.error("--pipeline writes the workload's own format; it takes no --format")
    if args.pipeline:
        try:
            out, how = export_pipeline(
                args.run_dir, args.which, args.out, step=args.step, use_ema=not args.no_ema, fuse_lora=args.fuse_lora
            )
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{out}: {how}")
        return 0
    try:
        out, files, how = export(
            args.run_dir, args.which, args.out, step=args.step, max_shard_size=args.max_shard_size, format=args.format
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(f.name for f in files[:3]) + (f" ... ({len(files)} files)" if len(files) > 3 else "")
    print(f"{out}: {names} {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
