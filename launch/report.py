"""Print the final metrics of finished runs side by side.

python -m launch.report runs/autoregressive/made runs/autoregressive/nade ...
python -m launch.report --metrics frame_map,test/accuracy runs/oadtr/oadtr runs/oadtr/gru
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.cli import program


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=program("launch.report"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument(
        "--metrics", help="comma-separated final_metrics.json keys to show (default: test NLL and bits/dim, best step)"
    )
    args = parser.parse_args(argv)
    finals = {}
    for run in args.runs:
        path = run / "final_metrics.json"
        if not path.exists():
            print(f"{run}: no final_metrics.json (run not finished?)", file=sys.stderr)
            return 1
        finals[run] = json.loads(path.read_text())
    if args.metrics:
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
