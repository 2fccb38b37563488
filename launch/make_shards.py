"""Shard tools: build the embedded datasets, verify a shard folder against its manifest.

    python -m launch.make_shards digits --out data/digits
    python -m launch.make_shards verify data/digits/train
"""

from __future__ import annotations

import argparse
import sys

from data_pipelines.shards import verify_shards
from data_pipelines.sources import digits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.make_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("digits", help="binarized 8x8 digits (scikit-learn's copy)")
    p.add_argument("--out", default="data/digits")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")
    p = sub.add_parser("verify", help="check shards against manifest.json")
    p.add_argument("folders", nargs="+")
    args = parser.parse_args(argv)

    if args.command == "digits":
        if digits.is_built(args.out) and not args.force:
            print(f"{args.out}: already built (use --force to rebuild)")
            return 0
        for split, m in digits.build(args.out).items():
            print(f"{args.out}/{split}: {m['total_samples']} samples in {len(m['shards'])} shards")
        return 0

    bad = 0
    for folder in args.folders:
        problems = verify_shards(folder)
        bad += len(problems)
        print("\n".join(problems) if problems else f"{folder}: ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
