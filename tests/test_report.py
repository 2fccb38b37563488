"""launch.report: the density table, and the headline table across workloads."""

from __future__ import annotations

import json

import yaml

from launch import report


def fake_run(root, name, model, final):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    (run / "final_metrics.json").write_text(json.dumps(final))
    return run


def test_headline_table_names_each_workloads_own_metric(tmp_path, capsys):
    runs = [
        fake_run(tmp_path, "lm_flash", {"name": "lm", "attention": "flash", "seq_len": 4096},
                 {"step": 200, "test/bits_per_byte": 3.3171, "test/nll": 9.0}),
        fake_run(tmp_path, "sd", {"name": "sd"},
                 {"step": 1500, "val/loss": 0.2, "color_match_guided": 0.9333, "color_match_unconditional": 0.2}),
        fake_run(tmp_path, "made", {"name": "made"},
                 {"step": 3000, "test/nll": 21.5, "test/bits_per_dim": 0.4846}),
        fake_run(tmp_path, "nade_val_only", {"name": "nade"}, {"step": 10, "val/nll": 30.0}),
    ]  # fmt: skip
    assert report.main(["--headline", *map(str, runs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["run", "workload", "headline", "steps"]
    assert set(lines[1]) == {"-", " "}
    rows = {line.split()[0]: line for line in lines[2:6]}
    assert "lm flash, 4096 ctx" in rows["lm_flash"] and "bits/byte 3.317" in rows["lm_flash"]
    assert "NLL" not in rows["lm_flash"]  # one headline group per run
    assert "colour match guided 0.933, unconditional 0.200" in rows["sd"]
    assert "NLL (nats) 21.500, bits/dim 0.485" in rows["made"]
    assert "NLL (nats) (val) 30.000" in rows["nade_val_only"]
    assert rows["sd"].rstrip().endswith("1500")
    # the steps column lines up under its header
    assert {line.rindex(line.split()[-1]) for line in lines[2:6]} == {lines[0].index("steps")}
    assert lines[-1] == f"TensorBoard: tensorboard --logdir {tmp_path} --host 127.0.0.1"


def test_an_unfinished_run_is_named(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    assert report.main(["--headline", str(tmp_path / "half")]) == 1
    assert "half: no final_metrics.json" in capsys.readouterr().err
