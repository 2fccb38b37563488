"""Continue a prompt with a trained language model (the `lm` workload), on one process.

    python -m launch.generate RUN_DIR --prompt "def " [--max-new-tokens 200] [--temperature 1.0]
        [--top-k 0] [--seed 0] [--step N | --which best|latest|PATH] [--no-cache] [--device auto]

The weights come from the run's best/ export (the default when there is one), its newest
complete checkpoint (`latest`), `--step N`, or any step-N folder, of every checkpoint layout
(launch/export.py reads them the same way). The tokenizer is the one saved with them
(`tokenizer.json` in the checkpoint), else the recipe's model.tokenizer. The text goes to
stdout, the speed (new tokens per second) to stderr. `--temperature 0` is greedy decoding;
`--no-cache` recomputes the window for every token (models/lm/generate.py says how either
slides past model.seq_len).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from launch.cli import program
from launch.export import source
from launch.recipes import load_recipe


def same_file(tokenizer: str, record: Path) -> bool:
    """Whether the recipe's model.tokenizer is still the checkpoint's copy (a folder may also
    name the document separator, which the copy alone does not)."""
    from data_pipelines.text_tokenizer import tokenizer_file

    try:
        return bool(tokenizer) and tokenizer_file(tokenizer).read_bytes() == record.read_bytes()
    except FileNotFoundError:
        return False


def load_model(run_dir: Path, which: str | None = None, step: int | None = None, device: str = "cpu"):
    """(workload, model in eval mode on `device`, the folder its weights came from)."""

    from models.lm.workload import TOKENIZER_RECORD
    from models.registry import build_workload
    from trainer.export import export_checkpoint, iter_exported

    src = source(run_dir, which, step)
    recipe = src / "config.yaml" if (src / "config.yaml").is_file() else run_dir / "config.yaml"
    cfg = load_recipe(recipe, ["trainer.resume=never"])
    if cfg.model.name != "lm":
        raise ValueError(f"{recipe}: model.name is {cfg.model.name!r}; launch.generate runs the 'lm' workload")
    record = src / TOKENIZER_RECORD
    if record.is_file() and not same_file(cfg.model.tokenizer, record):
        cfg.model.tokenizer = str(record)  # the tokenizer the weights were trained with
    workload = build_workload(cfg.model)
    model = workload.build_model()
    if (src / "meta.json").is_file():  # a best/ export: safetensors already
        weights = dict(iter_exported(src))
    else:
        with tempfile.TemporaryDirectory(prefix="generate-") as tmp:
            export_checkpoint(src, Path(tmp))
            weights = dict(iter_exported(Path(tmp)))
    model.load_state_dict(weights, strict=True)
    return workload, model.to(device).eval(), src


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=program("launch.generate"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", help="text to continue (default: the recipe's model.sample_prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--which", help="best, latest, or a step-N folder (default: best if the run has one)")
    parser.add_argument("--step", type=int, help="checkpoints/step-N of the run")
    parser.add_argument("--no-cache", action="store_true", help="recompute the window for every token")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1 ...")
    args = parser.parse_args(argv)
    if args.step is not None and args.which is not None:
        parser.error("give --step or --which, not both")
    if args.max_new_tokens < 0 or args.top_k < 0 or args.temperature < 0:
        parser.error("--max-new-tokens, --top-k and --temperature must be >= 0")

    import torch

    from models.lm.generate import generate

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        workload, model, src = load_model(args.run_dir, args.which, args.step, device)
        prompt = workload.encode_text(workload.cfg.sample_prompt if args.prompt is None else args.prompt)
        prompt = prompt or [workload.separator_id()]
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    seq = generate(
        model,
        torch.tensor([prompt], device=device),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=torch.Generator().manual_seed(args.seed),
        cache=not args.no_cache,
    )
    ids = seq[0].tolist()
    seconds = time.perf_counter() - started
    print(workload.decode_text(ids), flush=True)
    how = "recomputed window" if args.no_cache or not model.has_state else "cached"
    print(
        f"{args.max_new_tokens} new tokens in {seconds:.2f} s: {args.max_new_tokens / max(seconds, 1e-9):.1f} "
        f"tokens/s ({how}, model.attention={workload.cfg.attention}, {device}; weights from {src})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
