"""Print the final metrics of finished runs side by side.

    python -m launch.report runs/autoregressive/made runs/autoregressive/nade ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    run_dirs = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not run_dirs:
        print(__doc__)
        return 2
    rows = []
    for run in run_dirs:
        path = run / "final_metrics.json"
        if not path.exists():
            print(f"{run}: no final_metrics.json (run not finished?)", file=sys.stderr)
            return 1
        m = json.loads(path.read_text())
        rows.append((run.name, m.get("test/nll"), m.get("test/bits_per_dim"), m.get("best_step"), m["step"]))
    print(f"\n{'model':<12}{'test NLL (nats)':>16}{'bits/dim':>10}{'best step':>11}{'steps':>7}")
    for name, nll, bpd, best, steps in sorted(rows, key=lambda r: -(r[1] or 0)):
        print(f"{name:<12}{nll:>16.3f}{bpd:>10.4f}{best if best is not None else '-':>11}{steps:>7}")
    common = Path(*Path(run_dirs[0]).parts[:-1]) if len(run_dirs) > 1 else run_dirs[0]
    print(f"\nTensorBoard: tensorboard --logdir {common} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
