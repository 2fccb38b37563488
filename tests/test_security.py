"""What we tell users to run must not open doors: every TensorBoard command we print or
document binds to 127.0.0.1 (reach it through an SSH tunnel), never to all interfaces."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_tensorboard_command_binds_to_loopback():
    found = []
    for path in [
        ROOT / "README.md",
        ROOT / "Makefile",
        *ROOT.glob("launch/*.py"),
        *ROOT.glob("slurm/*"),
        *ROOT.glob("configs/**/*.yaml"),
        *ROOT.glob("benchmarks/*.md"),
    ]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"tensorboard\s+--logdir", line):
                found.append((path.relative_to(ROOT), n, line))
    assert found  # the README documents it
    loose = [
        f"{p}:{n}: {line.strip()}" for p, n, line in found if "--host 127.0.0.1" not in line or "--bind_all" in line
    ]
    assert not loose, "\n".join(loose)
