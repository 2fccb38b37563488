"""Shard tools: build the embedded datasets, turn your data into shards, index and verify.

    python -m launch.make_shards digits --out data/digits
    python -m launch.make_shards from-datasets /data/saved --split train --out /data/shards/train \\
        --columns image:jpg,caption:txt,meta:json
    python -m launch.make_shards from-folder /data/pictures --out /data/shards/train
    python -m launch.make_shards from-folder /data/imagefolder/train --out /data/shards/train  # metadata.jsonl
    python -m launch.make_shards index /data/img2dataset_out
    python -m launch.make_shards text stdlib --seq-len 4096 --out data/lm/stdlib-4k
    python -m launch.make_shards text /data/enwik8 --seq-len 4096 --val-fraction 0.05 --test-fraction 0.05 \\
        --out /data/shards/enwik8-4k
    python -m launch.make_shards tokenizer stdlib --vocab-size 4096 --out data/lm/bpe/tokenizer.json
    python -m launch.make_shards text stdlib --seq-len 1024 --tokenizer data/lm/bpe/tokenizer.json \\
        --out data/lm/bpe-1k
    python -m launch.make_shards shapes --out data/shapes --size 32
    python -m launch.make_shards mixture2d --out data/mixture2d
    python -m launch.make_shards detection --out data/shapes-det
    python -m launch.make_shards action-streams --out data/action-streams
    python -m launch.make_shards latents data/shapes --vae runs/sd/tiny_vae/vae --out data/shapes-latents
    python -m launch.make_shards latents /data/shards --pretrained /models/sd15 --bucket-area 262144 \\
        --bucket-step 64 --out /data/latents  # aspect-ratio buckets, as data.buckets
    python -m launch.make_shards verify data/digits/train

Every tool that writes shards takes --min-shards: a training split needs a shard per reader
(ranks x data.num_workers), and a split with fewer than a typical run's readers gets a
warning naming it (docs/data.md).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from data_pipelines.shards import MANIFEST, TYPICAL_READERS, few_shards_warning, index_shards, verify_shards
from data_pipelines.sources import digits
from launch.cli import program

MIN_SHARDS = 16  # for users' data: enough for 2 ranks x 8 workers, or 16 single-worker ranks


def _add_shard_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="shard folder to write (gets manifest.json)")
    p.add_argument("--maxcount", type=int, default=10_000, help="samples per shard at most")
    p.add_argument("--maxsize", type=float, default=256e6, help="bytes per shard at most")
    _add_min_shards(p, MIN_SHARDS)


def _add_min_shards(p: argparse.ArgumentParser, default: int, own: str = "") -> None:
    p.add_argument(
        "--min-shards",
        type=int,
        default=default,
        help=f"shards per split at least, where there are that many samples (default: "
        f"{own or default}); a training split needs one per rank x loader worker",
    )


# the data.buckets key each --bucket-* flag of `latents` stands for (for errors)
BUCKET_FLAGS = {
    "area": "--bucket-area",
    "side": "--bucket-side",
    "step": "--bucket-step",
    "min_side": "--bucket-min-side",
    "max_side": "--bucket-max-side",
    "max_ratio": "--bucket-max-ratio",
    "sizes": "--buckets",
}


def _add_bucket_flags(p: argparse.ArgumentParser) -> None:
    from trainer.config import BucketsConfig

    d = BucketsConfig()
    g = p.add_argument_group(
        "aspect-ratio buckets (as data.buckets, docs/data.md; the train split only, val/test stay square)"
    )
    g.add_argument("--bucket-area", type=int, default=d.area, help="pixels per generated bucket, e.g. 262144")
    g.add_argument("--bucket-side", type=int, default=d.side, help="the same as --bucket-area side x side")
    g.add_argument("--bucket-step", type=int, default=d.step, help=f"bucket sides are multiples of this ({d.step})")
    g.add_argument("--bucket-min-side", type=int, default=d.min_side, help="0: the step")
    g.add_argument("--bucket-max-side", type=int, default=d.max_side, help="0: bounded by the ratio only")
    g.add_argument("--bucket-max-ratio", type=float, default=d.max_ratio, help="longer side over shorter, at most")
    g.add_argument("--buckets", type=_bucket_sizes, default=[], help="or list them: WIDTHxHEIGHT,... e.g. 32x32,48x24")


def _bucket_sizes(text: str) -> list[list[int]]:
    sizes = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if not m:
            raise argparse.ArgumentTypeError(f"'{item}' is not WIDTHxHEIGHT (e.g. 48x24)")
        sizes.append([int(m[1]), int(m[2])])
    return sizes


def _buckets(args: argparse.Namespace):
    """The buckets the --bucket-* flags give, by data.buckets' own checks and generation
    (an error names the flag), or None."""
    from data_pipelines.buckets import Buckets, generate_buckets
    from trainer.config import BucketsConfig, ConfigError, bucket_generation, check_buckets

    b = BucketsConfig(
        area=args.bucket_area,
        side=args.bucket_side,
        step=args.bucket_step,
        min_side=args.bucket_min_side,
        max_side=args.bucket_max_side,
        max_ratio=args.bucket_max_ratio,
        sizes=args.buckets,
    )
    try:
        check_buckets(b)
    except ConfigError as exc:  # "config key 'data.buckets.<key>[.<i>]': why" -> "--<flag>[ (entry i)]: why"
        m = re.match(r"config key 'data\.buckets(?:\.(\w+))?(?:\.(\d+))?': (.*)", str(exc), re.S)
        if m is None:
            raise
        flag = BUCKET_FLAGS.get(m[1], "--bucket-area/--bucket-side") + (f" (entry {m[2]})" if m[2] else "")
        raise ValueError(f"{flag}: {m[3]}") from None
    if not b.enabled:
        return None
    return Buckets(tuple(map(tuple, b.sizes)) if b.sizes else tuple(generate_buckets(**bucket_generation(b))))


def _add_text_source(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "source",
        nargs="?" if default else None,
        default=default,
        help="'stdlib' (the Python standard library, no download), a folder of "
        "text files, one file (e.g. enwik8), or a datasets folder with --column"
        + (f" (default: {default})" if default else ""),
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.02, help="share of the documents (of one file: its bytes) in val"
    )
    p.add_argument("--test-fraction", type=float, default=0.02, help="and in test; train has the rest")
    p.add_argument("--pattern", default="*", help="folder source: which files (glob, default all)")
    p.add_argument("--column", help="datasets source: the text column")
    p.add_argument("--split", help="datasets source: split of a DatasetDict")


def _summary(
    folder,
    manifest: dict,
    split: str = "",
    remedy: str = f"for such a run write it with --min-shards {TYPICAL_READERS}",
) -> str:
    """The summary line (stdout), and a warning (stderr) for a split too small to share."""
    warning = few_shards_warning(folder, len(manifest["shards"]), split)
    if warning:
        print(f"{warning}; {remedy}", file=sys.stderr)
    return f"{folder}: {manifest['total_samples']} samples in {len(manifest['shards'])} shards"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program("launch.make_shards"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("digits", help="binarized 8x8 digits (scikit-learn's copy)")
    p.add_argument("--out", default="data/digits")
    _add_min_shards(p, 0, "8 train, 2 val, 2 test")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")

    p = sub.add_parser("from-datasets", help="a Hugging Face dataset (save_to_disk folder or hub name)")
    p.add_argument("source", help="folder written by save_to_disk, a local data folder, or a hub name")
    p.add_argument("--split", help="split of a DatasetDict or hub dataset (default: train)")
    p.add_argument(
        "--columns", help="COLUMN:EXT,... (ext: png jpg webp txt json npy cls); default: every column, by feature type"
    )
    p.add_argument("--key-column", help="column whose values become sample keys (default: row index)")
    _add_shard_size(p)

    p = sub.add_parser(
        "from-folder",
        help="images with .txt/.json sidecars of the same name, or a Hugging Face imagefolder (metadata.jsonl/.csv)",
    )
    p.add_argument("folder")
    p.add_argument(
        "--require-caption",
        action="store_true",
        help="an image without a caption is an error (default: a warning)",
    )
    p.add_argument(
        "--caption-column",
        default="text",
        help="imagefolder: the metadata column holding the caption (default: text)",
    )
    _add_shard_size(p)

    p = sub.add_parser("shapes", help="captioned coloured shapes (text-to-image, detection)")
    p.add_argument("--out", default="data/shapes")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--max-shapes", type=int, default=1, help="shapes per image at most (1-9)")
    _add_min_shards(p, 0, "8 per split")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")

    p = sub.add_parser("detection", help="scenes of several shapes with boxes and classes (DETR)")
    p.add_argument("--out", default="data/shapes-det")
    _add_min_shards(p, 0, "8 per split")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")

    p = sub.add_parser("action-streams", help="frame-feature streams with action segments, as windows (OadTR)")
    p.add_argument("--out", default="data/action-streams")
    _add_min_shards(p, 0, "8 per split")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")

    p = sub.add_parser("latents", help="precompute VAE latents (and frozen text states) of image-caption shards")
    p.add_argument("src", help="a shard folder, or a folder of train/val/test shard folders")
    p.add_argument("--out", required=True)
    p.add_argument("--vae", default="", help="AutoencoderKL folder (a `vae` run's vae/)")
    p.add_argument("--pretrained", default="", help="diffusers SD folder: its VAE, and its frozen text encoder")
    p.add_argument("--image-size", type=int, default=32, help="the square side without buckets (and of val/test)")
    p.add_argument("--batch", type=int, default=64, help="images per VAE batch (of one bucket)")
    p.add_argument("--maxcount", type=int, default=0, help="samples per shard (default: as in the source)")
    _add_min_shards(p, 0, "as many as the source has")
    _add_bucket_flags(p)

    p = sub.add_parser("mixture2d", help="points of a 2-D Gaussian mixture (score-based models)")
    p.add_argument("--out", default="data/mixture2d")
    _add_min_shards(p, 0, "8 per split")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")

    p = sub.add_parser(
        "text", help="byte or token windows of text for language models (stdlib, folder, file, datasets column)"
    )
    _add_text_source(p)
    p.add_argument(
        "--seq-len", type=int, required=True, help="bytes (or tokens) a model sees; samples hold seq_len + 1"
    )
    p.add_argument("--out", required=True, help="folder to write train/, val/, test/ into")
    p.add_argument(
        "--tokenizer", help="a tokenizer.json or a local transformers tokenizer folder: windows of ids, not bytes"
    )
    p.add_argument("--eos", help="with --tokenizer: the token that ends each document (default: the tokenizer's own)")
    p.add_argument(
        "--workers",
        type=int,
        help="with --tokenizer: tokenizing processes (default: one per 8 MB of text, one per CPU at most)",
    )
    _add_min_shards(p, MIN_SHARDS)
    p.add_argument("--force", action="store_true", help="rebuild even if already built")

    p = sub.add_parser("tokenizer", help="train a byte-level BPE on the train split of a text source (deterministic)")
    _add_text_source(p, default="stdlib")
    p.add_argument("--vocab-size", type=int, default=4096, help="ids in all, <|endoftext|> and the 256 bytes included")
    p.add_argument("--out", required=True, help="the tokenizer.json to write")
    p.add_argument("--force", action="store_true", help="retrain even if --out exists")

    p = sub.add_parser("index", help="write manifest.json for existing tars (e.g. img2dataset's)")
    p.add_argument("folder")
    p.add_argument("--pattern", default="*.tar", help="which files are shards (glob, default *.tar)")

    p = sub.add_parser("verify", help="check shards against manifest.json")
    p.add_argument("folders", nargs="+")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    try:
        return run(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _embedded(source, args, **kwargs) -> int:
    """Build one of the generated datasets (train/val/test) unless it is there already."""
    if source.is_built(args.out) and not args.force:
        print(f"{args.out}: already built (use --force to rebuild)")
        return 0
    for split, m in source.build(args.out, min_shards=args.min_shards, **kwargs).items():
        print(_summary(f"{args.out}/{split}", m))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "digits":
        return _embedded(digits, args)

    if args.command == "from-datasets":
        from data_pipelines.sources import hf  # imports `datasets`: slow, only when needed

        ds = hf.load_source(args.source, args.split)
        columns = hf.parse_columns(args.columns) if args.columns else None
        m = hf.dataset_to_shards(
            ds,
            args.out,
            columns=columns,
            key_column=args.key_column,
            maxcount=args.maxcount,
            maxsize=args.maxsize,
            min_shards=args.min_shards,
        )
        print(_summary(args.out, m, split=args.split or "train"))
        return 0

    if args.command == "from-folder":
        from data_pipelines.sources.folder import folder_to_shards

        m = folder_to_shards(
            args.folder,
            args.out,
            require_caption=args.require_caption,
            caption_column=args.caption_column,
            maxcount=args.maxcount,
            maxsize=args.maxsize,
            min_shards=args.min_shards,
        )
        print(_summary(args.out, m))
        return 0

    if args.command == "latents":
        from data_pipelines.sources import latents

        if bool(args.vae) == bool(args.pretrained):
            raise ValueError("give exactly one of --vae and --pretrained")
        kw = dict(
            vae_dir=args.vae,
            pretrained=args.pretrained,
            image_size=args.image_size,
            buckets=_buckets(args),
            batch=args.batch,
            maxcount=args.maxcount,
            min_shards=args.min_shards,
        )
        if (Path(args.src) / MANIFEST).exists():
            out = {args.out: latents.precompute(args.src, args.out, **kw)}
        else:
            out = {f"{args.out}/{s}": m for s, m in latents.precompute_splits(args.src, args.out, **kw).items()}
        if not out:
            raise FileNotFoundError(f"{args.src}: neither a shard folder ({MANIFEST}) nor train/val/test of them")
        for folder, m in out.items():
            per_bucket = ", ".join(f"{b}: {n}" for b, n in m.get("buckets", {}).items())
            print(_summary(folder, m) + (f" (per bucket: {per_bucket})" if per_bucket else ""))
        return 0

    if args.command == "shapes":
        from data_pipelines.sources import shapes

        if not 1 <= args.max_shapes <= len(shapes.POSITIONS):
            raise ValueError(f"--max-shapes must be 1..{len(shapes.POSITIONS)}, got {args.max_shapes}")
        return _embedded(shapes, args, size=args.size, max_shapes=args.max_shapes)

    if args.command == "detection":
        from data_pipelines.sources import shape_scenes

        return _embedded(shape_scenes, args)

    if args.command == "action-streams":
        from data_pipelines.sources import action_streams

        return _embedded(action_streams, args)

    if args.command == "mixture2d":
        from data_pipelines.sources import points

        return _embedded(points, args)

    if args.command == "text":
        from data_pipelines.sources import text

        out = Path(args.out)
        if (out / "train" / MANIFEST).exists() and not args.force:
            print(f"{args.out}: already built (use --force to rebuild)")
            return 0
        built = text.build(
            args.source,
            out,
            seq_len=args.seq_len,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            pattern=args.pattern,
            column=args.column,
            split=args.split,
            min_shards=args.min_shards,
            tokenizer=args.tokenizer,
            eos=args.eos,
            workers=args.workers,
        )
        for split, m in built.items():
            if args.tokenizer is None:
                tail = f", {m['dropped_tail_bytes']} tail bytes dropped" if m["dropped_tail_bytes"] else ""
                print(_summary(out / split, m) + f" of {args.seq_len + 1} bytes{tail}")
                continue
            tail = f", {m['dropped_tail_tokens']} tail tokens dropped" if m["dropped_tail_tokens"] else ""
            print(
                _summary(out / split, m) + f" of {args.seq_len + 1} {m['dtype']} ids{tail}; {m['tokens']} tokens "
                f"of {m['text_bytes']} text bytes ({m['text_bytes'] / m['tokens']:.2f} bytes per token)"
            )
        return 0

    if args.command == "tokenizer":
        import time

        from data_pipelines.sources import text
        from data_pipelines.text_tokenizer import train_byte_bpe

        if Path(args.out).exists() and not args.force:
            print(f"{args.out}: already trained (use --force to retrain)")
            return 0
        start = time.perf_counter()
        texts = text.split_texts(
            args.source,
            "train",
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            pattern=args.pattern,
            column=args.column,
            split=args.split,
        )
        info = train_byte_bpe(texts, args.out, vocab_size=args.vocab_size)
        print(
            f"{args.out}: byte-level BPE of {info.vocab_size} ids trained on the train split of {args.source} "
            f"in {time.perf_counter() - start:.0f} s; sha256 {info.sha256}"
        )
        return 0

    if args.command == "index":
        print(
            _summary(
                args.folder, index_shards(args.folder, args.pattern), remedy="for such a run write more, smaller shards"
            )
        )
        return 0

    bad = 0
    for folder in args.folders:
        problems = verify_shards(folder)
        bad += len(problems)
        print("\n".join(problems) if problems else f"{folder}: ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
