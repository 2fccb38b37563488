"""`python -m launch.export RUN_DIR --pipeline`: a diffusers folder from any checkpoint of an sd
run, written by the code that writes pipeline/ at the end of the run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def checkpoint_tensors(step_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors under `prefix`, with it taken off."""
    from trainer import sharded

    state = step_dir / sharded.STATE_DIR
    names = [n for n in sharded.model_tensors(sharded.read_metadata(state)) if n.startswith(prefix)]
    return {n[len(prefix) :]: t for n, t in sharded.read_model_tensors(state, names).items()}


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder).unet.state_dict()


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory, shapes_dir, pretrained_dir):
    """A 6-step full fine-tune with EMA, one CPU rank, checkpoints at 3 and 6."""
    import os

    run_dir = tmp_path_factory.mktemp("export") / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/sd/finetune_sd15.yaml"),
        f"run.dir={run_dir}",
        "trainer.progress_bar=false",
        f"model.pretrained={pretrained_dir}",
        "model.image_size=32",
        "model.ema_decay=0.9",
        "model.sample_steps=1",
        f"data.train.urls={shapes_dir}/train",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=1",
        "trainer.max_steps=6",
        "trainer.grad_accum_steps=1",
        "trainer.mixed_precision=no",
        "trainer.sample_every=0",
        "trainer.log_every=1",
        "trainer.checkpoint_every=3",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def test_pipeline_from_a_middle_checkpoint_holds_its_ema_unet(finetune_run, tmp_path):
    from launch.export import main

    assert main([str(finetune_run), "--pipeline", "--step", "3", "--out", str(tmp_path / "ema")]) == 0
    assert main([str(finetune_run), "--pipeline", "--step", "3", "--no-ema", "--out", str(tmp_path / "raw")]) == 0
    step3 = finetune_run / "checkpoints" / "step-3"
    ema, raw = checkpoint_tensors(step3, "ema_unet."), checkpoint_tensors(step3, "unet.")
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)  # they differ
    for folder, want in ((tmp_path / "ema", ema), (tmp_path / "raw", raw)):
        got = unet_weights(folder)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), folder.name
    # the default source is the newest checkpoint, and the default folder is named after it;
    # it is what the end of the run wrote (the same code)
    assert main([str(finetune_run), "--pipeline"]) == 0
    last, end = unet_weights(finetune_run / "pipeline-step-6"), unet_weights(finetune_run / "pipeline")
    assert all(torch.equal(last[k], end[k]) for k in end)
    assert any(not torch.equal(last[k], ema[k]) for k in ema)  # step 6, not step 3


def test_pipeline_export_refuses_what_it_cannot_write(finetune_run, tmp_path, capsys):
    from launch.export import main

    assert main([str(finetune_run), "--pipeline", "--fuse-lora", "--out", str(tmp_path / "x")]) == 2
    assert "--fuse-lora: the run of" in capsys.readouterr().err
    assert main([str(finetune_run), "--pipeline", "--step", "4"]) == 2
    assert "step-4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(finetune_run), "--no-ema"])  # without --pipeline
