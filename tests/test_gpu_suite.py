"""benchmarks/gpu_suite.py --smoke on the CPU: the suite the GPU day runs keeps working. Every
measurement is in the summary with a number or a reason, and the LM and UNet ones measure."""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_smoke_suite_reports_every_measurement(tmp_path):
    from benchmarks.gpu_suite import SMOKE, plan

    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--work", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    summary = lines[-1]
    assert summary["suite"] == "gpu_suite" and summary["smoke"] is True
    env = summary["environment"]
    assert {"device", "torch", "cuda", "gpu_count"} <= env.keys()

    results = summary["measurements"]
    assert list(results) == [key for key, _ in plan(SMOKE)]
    for key, row in results.items():
        number = isinstance(row.get("value"), int | float)
        reason = isinstance(row.get("skipped") or row.get("error"), str)
        assert number or reason, (key, row)
        assert {"measurement": key, **row} in lines[:-1], key  # its own line came first
    measured = {key for key, row in results.items() if "value" in row}
    assert any(k.startswith("lm_") for k in measured), {k: results[k] for k in results if k.startswith("lm_")}
    assert {"unet_tiny_eager", "unet_sd15_eager"} <= measured, {k: results[k] for k in results if "unet" in k}
    for key in measured:
        assert results[key]["value"] > 0, (key, results[key])

    targets = summary["targets"]
    assert targets["lm_mfu"]["best"] == max(results[k]["value"] for k in measured if k.startswith("lm_"))
    assert targets["lm_mfu"]["met"] in (True, False) and "note" in targets["lm_mfu"]  # a CPU is not the class
    if "value" in results["overhead"]:
        assert targets["overhead_ratio"]["met"] == (results["overhead"]["value"] <= 1.03)


def test_a_measurement_past_its_budget_is_killed_with_its_children():
    """A worker and whatever it started (torchrun's ranks) go when the budget is spent, and a
    run whose numbers are in is stopped at once, before its final checkpoint."""
    from benchmarks.gpu_suite import run_group

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    parent = f"import subprocess, time; print(subprocess.Popen({sleeper!r}).pid, flush=True); time.sleep(60)"
    code, out, err = run_group([sys.executable, "-c", parent], timeout_s=3)
    assert code is None and "stopped after the 3 s budget" in err, (code, err)
    grandchild = int(out)
    time.sleep(0.5)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    code, out, err = run_group([sys.executable, "-c", "import time; time.sleep(60)"], 30, done=lambda: True)
    assert code is None and "budget" not in err
    assert run_group([sys.executable, "-c", "import sys; sys.exit(3)"], 30)[0] == 3
