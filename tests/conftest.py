import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The embedded digits dataset, written to shards once per test session."""
    from data_pipelines.sources import digits

    out = tmp_path_factory.mktemp("digits")
    digits.build(out)
    return out


def write_numbered_shards(folder: Path, counts: list[int]) -> list[str]:
    """Shards whose samples are numbered 0..N-1 (key and a `num` field)."""
    from data_pipelines.shards import write_shards

    folder.mkdir(parents=True, exist_ok=True)
    urls, start = [], 0
    for i, n in enumerate(counts):
        samples = ({"__key__": f"s{j:06d}", "num": str(j).encode()} for j in range(start, start + n))
        write_shards(samples, folder / f"part{i}", prefix=f"p{i}", maxcount=n)
        urls.append(str(folder / f"part{i}" / f"p{i}-000000.tar"))
        start += n
    return urls


def decode_num(sample: dict) -> int:
    return int(sample["num"])


def collate_list(samples: list) -> list:
    return list(samples)


@pytest.fixture(scope="session")
def cpu_env():
    """Environment for subprocess runs: CPU ranks, no stray GPU, quiet."""
    env = dict(os.environ)
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


def kill_tree(pid):
    """SIGKILL a launcher and every process under it, all at once.

    torch's elastic agent starts each rank in a session of its own, so killing the
    launcher's process group would leave the ranks running.
    """
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def kill_past_checkpoint(cmd, env, run_dir: Path, checkpoint: int, past: int, timeout: float = 300) -> None:
    """Start a training command, SIGKILL it (launcher and ranks) once checkpoint `step-N` is
    complete and a step >= `past` is logged, and check it really died mid-run."""
    import subprocess

    from trainer.metrics import read_jsonl

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def past_checkpoint():
        m = run_dir / "metrics.jsonl"
        return (
            (run_dir / f"checkpoints/step-{checkpoint}/COMPLETE.json").exists()
            and m.exists()
            and any(r.get("step", 0) >= past for r in read_jsonl(m)[-3:])
        )

    reached = wait_for(past_checkpoint, proc, timeout=timeout)
    kill_tree(proc.pid)
    proc.wait()
    assert reached, "the run ended before it could be killed mid-way"
    assert not (run_dir / "final_metrics.json").exists()


def wait_for(predicate, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@pytest.fixture(scope="session")
def smoke_reference(tmp_path_factory, digits_dir, cpu_env):
    """The smoke recipe on 2 ranks (one node, accelerate launch), never interrupted: what
    the SLURM, preemption and two-node runs must reproduce step for step."""
    from launching import accelerate_cmd, run_ok, smoke_overrides

    run_dir = tmp_path_factory.mktemp("smoke-reference")
    run_ok(accelerate_cmd() + smoke_overrides(run_dir, digits_dir), cpu_env)
    return run_dir


# ---------------------------------------------------------------- latent diffusion
@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small captioned-shapes build (with its tokenizer), once per session, for every SD test."""
    from data_pipelines.sources import shapes

    out = tmp_path_factory.mktemp("shapes")
    shapes.build(out, size=32, counts={"train": (160, 0), "val": (40, 1)})
    return out


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """An untrained AutoencoderKL folder (factor 4: 32x32 images -> 4x8x8 latents)."""
    from models.sd.vae import VAEConfig, build_autoencoder

    torch.manual_seed(0)
    vae = build_autoencoder(VAEConfig(block_out_channels=[16, 32, 32], norm_num_groups=8))
    vae.register_to_config(scaling_factor=0.5)
    out = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(out)
    return out


def scratch_workload(shapes_dir, tiny_vae, **overrides):
    from models.sd.workload import SDConfig, SDWorkload

    cfg = dict(
        vae=str(tiny_vae),
        tokenizer=str(shapes_dir / "tokenizer"),
        unet_channels=[32, 32],
        text_hidden=32,
        ema_decay=0.9,
        color_match_samples=0,
    )
    cfg.update(overrides)
    return SDWorkload(SDConfig(**cfg))


@pytest.fixture(scope="session")
def pretrained_dir(tmp_path_factory, shapes_dir, tiny_vae):
    """A tiny Stable Diffusion folder in diffusers layout: what `model.pretrained` reads for
    SD 1.5, at toy size and random weights."""
    torch.manual_seed(0)
    model = scratch_workload(shapes_dir, tiny_vae, ema_decay=0).build_model()
    out = tmp_path_factory.mktemp("pretrained")
    from models.sd.tokenizer import load

    pipe = model.pipeline(load(shapes_dir / "tokenizer", 16))
    pipe.scheduler = type(model.noise_scheduler).from_config(model.noise_scheduler.config)  # DDPM, as SD ships
    pipe.save_pretrained(out)
    return out
