"""Print the final metrics of finished runs side by side.

python -m launch.report runs/autoregressive/made runs/autoregressive/nade ...
python -m launch.report --metrics frame_map,test/accuracy runs/oadtr/oadtr runs/oadtr/gru
python -m launch.report --headline runs/demo/lm_softmax runs/demo/lm_flash runs/demo/sd

--headline shows each run's own headline metrics, whatever its workload: held-out bits per
byte for language models, the colour check for text-to-image, mAP for detection, NLL for
density models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from launch.cli import program

# each workload's headline: the first group of (final_metrics key, label) a run has; a test/
# key falls back to its val/ twin for a run without a test split
HEADLINES = (
    (("test/bits_per_byte", "bits/byte"),),
    (("color_match_guided", "colour match guided"), ("color_match_unconditional", "unconditional")),
    (("map50", "mAP50"), ("map50_95", "mAP50-95")),
    (("frame_map", "frame mAP"),),
    (("test/nll", "NLL (nats)"), ("test/bits_per_dim", "bits/dim")),
)


def describe(run: Path) -> str:
    """The run's workload in a few words, from the config it was last saved with."""
    path = run / "config.yaml"
    if not path.exists():
        return "?"
    model = (yaml.safe_load(path.read_text()) or {}).get("model", {})
    name = str(model.get("name", "?"))
    if name == "lm":
        return f"lm {model.get('attention', '?')}, {model.get('seq_len', '?')} ctx"
    return name


def headline(metrics: dict) -> list[str]:
    for group in HEADLINES:
        cells = []
        for key, label in group:
            value, where = metrics.get(key), ""
            if value is None and key.startswith("test/"):
                value, where = metrics.get("val/" + key.removeprefix("test/")), " (val)"
            if isinstance(value, (int, float)):
                cells.append(f"{label}{where} {value:.3f}")
        if cells:
            return cells
    return []


def headline_table(finals: dict[Path, dict]) -> str:
    rows = [(run.name, describe(run), ", ".join(headline(m)) or "-", str(m["step"])) for run, m in finals.items()]
    head = ("run", "workload", "headline", "steps")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=program("launch.report"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument(
        "--metrics", help="comma-separated final_metrics.json keys to show (default: test NLL and bits/dim, best step)"
    )
    parser.add_argument("--headline", action="store_true", help="each run's headline metrics, any workload")
    args = parser.parse_args(argv)
    finals = {}
    for run in args.runs:
        path = run / "final_metrics.json"
        if not path.exists():
            print(f"{run}: no final_metrics.json (run not finished?)", file=sys.stderr)
            return 1
        finals[run] = json.loads(path.read_text())
    if args.headline:
        print("\n" + headline_table(finals))
    elif args.metrics:
        keys = args.metrics.split(",")
        print(f"\n{'run':<16}" + "".join(f"{k:>16}" for k in keys) + f"{'steps':>8}")
        for run, m in finals.items():
            cells = "".join(f"{m[k]:>16.4f}" if isinstance(m.get(k), (int, float)) else f"{'-':>16}" for k in keys)
            print(f"{run.name:<16}{cells}{m['step']:>8}")
    else:
        rows = [
            (run.name, m.get("test/nll"), m.get("test/bits_per_dim"), m.get("best_step"), m["step"])
            for run, m in finals.items()
        ]
        print(f"\n{'model':<12}{'test NLL (nats)':>16}{'bits/dim':>10}{'best step':>11}{'steps':>7}")
        for name, nll, bpd, best, steps in sorted(rows, key=lambda r: -(r[1] or 0)):
            print(f"{name:<12}{nll:>16.3f}{bpd:>10.4f}{best if best is not None else '-':>11}{steps:>7}")
    common = Path(*args.runs[0].parts[:-1]) if len(args.runs) > 1 else args.runs[0]
    print(f"\nTensorBoard: tensorboard --logdir {common} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
